"""Where the hub keeps files and whether it may use the network, read from the environment.

Each is read at every call rather than once at import, so a test, a job script or a user
can redirect the cache, the registry file or the network setting at any time.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """ANOMALYCLIP_CACHE, else $XDG_CACHE_HOME/anomalyclip, else ~/.cache/anomalyclip."""
    configured = os.environ.get("ANOMALYCLIP_CACHE")
    if configured:
        return Path(configured).expanduser().absolute()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return (Path(base).expanduser() / "anomalyclip").absolute()


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
