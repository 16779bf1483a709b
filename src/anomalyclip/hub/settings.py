"""Where the hub keeps files and whether it may use the network, read from the environment.

Each is read at every call rather than once at import, so a test, a job script or a user
can redirect the cache, the registry file or the network setting at any time.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """ANOMALYCLIP_CACHE, else $XDG_CACHE_HOME/anomalyclip, else ~/.cache/anomalyclip.

    A file there is refused with a hint: setting ANOMALYCLIP_CACHE to a weights file (to
    use that file) is an easy mistake, and it would otherwise surface later as
    ``[Errno 20] Not a directory`` on a path the user never wrote.
    """
    configured = os.environ.get("ANOMALYCLIP_CACHE")
    if configured:
        folder = Path(configured).expanduser().absolute()
        source = f"ANOMALYCLIP_CACHE={configured}"
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        folder = (Path(base).expanduser() / "anomalyclip").absolute()
        source = f"the cache folder {folder}"
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(
            f"{source} is a file, not a folder: point it at a folder (the cache keeps its "
            "files inside it, one subfolder per file); to use a weights file directly, pass "
            "its path (--clip-weights FILE)"
        )
    return folder


def user_registry_path() -> Path:
    """ANOMALYCLIP_REGISTRY, else registry.json (or .toml) in $XDG_CONFIG_HOME/anomalyclip."""
    configured = os.environ.get("ANOMALYCLIP_REGISTRY")
    if configured:
        return Path(configured).expanduser().absolute()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "anomalyclip"
    toml_path = base / "registry.toml"
    json_path = base / "registry.json"
    return toml_path if toml_path.is_file() and not json_path.is_file() else json_path


def offline() -> bool:
    """Whether ANOMALYCLIP_OFFLINE forbids downloads (air-gapped machines, CI)."""
    return os.environ.get("ANOMALYCLIP_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
