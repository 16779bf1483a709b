"""One way to hash a file, remembered while the file stays unchanged.

The hub verifies multi-GB backbones against registered checksums (and hashes a file that
could run code at every check), and the feature cache keys embeddings by each image's
bytes. They share this helper and its memo, so a file hashed
for one of them is not read again for another in the same process.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Literal, get_args

Algorithm = Literal["sha256", "sha1", "git-blob"]
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)
CHUNK = 1 << 20

# (resolved path, size, mtime_ns, ctime_ns, inode, algorithm) -> hex digest
_Key = tuple[str, int, int, int, int, str]
_memo: dict[_Key, str] = {}
_memo_lock = threading.Lock()


def file_digest(path: str | os.PathLike[str], algorithm: Algorithm = "sha256") -> str:
    """The hex digest of a file's bytes; ``"git-blob"`` is git's blob id of the file.

    Remembered for the life of the process, keyed by the resolved path, size, mtime,
    ctime, inode and algorithm: a write changes mtime and ctime (and ctime cannot be set
    back), a file renamed over another has a new inode, so a changed file is hashed again.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown hash algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")
    resolved = Path(path).resolve()
    stat = resolved.stat()
    key = (
        str(resolved),
        stat.st_size,
        stat.st_mtime_ns,
        stat.st_ctime_ns,
        stat.st_ino,
        algorithm,
    )
    with _memo_lock:
        known = _memo.get(key)
    if known is not None:
        return known
    digest = _hash_file(resolved, algorithm, stat.st_size)
    with _memo_lock:
        _memo[key] = digest
    return digest


def _hash_file(path: Path, algorithm: Algorithm, size: int) -> str:
    """Read the file once, in chunks: backbones are too large to hold in memory twice."""
    digest = hashlib.sha256() if algorithm == "sha256" else hashlib.sha1(usedforsecurity=False)
    if algorithm == "git-blob":  # git hashes b"blob <size>\0" followed by the content
        digest.update(f"blob {size}\0".encode())
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
