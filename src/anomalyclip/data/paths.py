"""Paths that a dataset's own index names stay inside the dataset's folder.

A CSV manifest, VisA's split file and ``meta.json`` list their files by path. A dataset
from elsewhere is a stranger's data: an index naming ``../../home/me/photos/x.png`` or
``/srv/private/y.png`` would have evaluation and training read files that are no part
of it (and write overlays of them). Such a path is refused, naming the index and the
path, unless the caller allows it (``--allow-outside-paths``: a manifest of one's own
that lists images kept elsewhere). The check is on the path as the file system resolves
it (``os.path.realpath``: ``..`` and symbolic links followed, the dataset folder's own
included), so a link inside the dataset that points outside it is refused like a path
that says ``../``; a lexical check let ``test/good/x.png -> /home/me/photo.png`` through.
"""

from __future__ import annotations

import os
from pathlib import Path

from anomalyclip.data.core import DatasetError

ALLOW_FLAG = "--allow-outside-paths"


def is_inside(path: str | Path, root: str | Path) -> bool:
    """Whether ``path`` (relative to ``root`` unless absolute) lies in ``root`` once both
    are resolved: ``..`` and symbolic links followed (a missing file is resolved as far
    as it exists)."""
    base = os.path.realpath(root)
    target = os.path.realpath(os.path.join(root, path))
    return os.path.commonpath([base, target]) == base


def listed_path(root: Path, value: object, where: str, what: str, allow_outside: bool) -> Path:
    """``root / value``: a file an index names (``where``: the index and line).

    Raises :class:`DatasetError` in one line when the path leaves ``root`` and
    ``allow_outside`` is false, or is no text.
    """
    if not isinstance(value, str):
        raise DatasetError(f"{where}: {what} must be a path, not {value!r}")
    if not allow_outside and not is_inside(value, root):
        raise DatasetError(
            f"{where}: {what} {value!r} is outside the dataset folder {root}; "
            f"pass {ALLOW_FLAG} to read it if you trust this index"
        )
    return root / value
