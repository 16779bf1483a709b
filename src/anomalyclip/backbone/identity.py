"""What identifies a backbone across machines: its name, its file's checksum, its shape.

A checkpoint trained on one machine must load on another where the weights sit
elsewhere, so a backbone is never recorded by path. The SHA-256 is that of the weights
file as registered (OpenAI's archive) or as given; the architecture catches a file of
another size even when no checksum was recorded (a Hugging Face folder has none).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A recorded backbone name that looks like this came from an old checkpoint: a path.
_PATH_SEPARATORS = ("/", "\\")


@dataclass(frozen=True)
class BackboneIdentity:
    name: str
    sha256: str | None = None
    architecture: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "architecture": dict(self.architecture)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackboneIdentity:
        return cls(
            str(data.get("name") or ""),
            data.get("sha256") or None,
            dict(data.get("architecture") or {}),
        )

    def differences(self, other: BackboneIdentity) -> list[str]:
        """How ``other`` (the backbone at hand) differs from this (the recorded one)."""
        found = []
        if self.sha256 and other.sha256 and self.sha256 != other.sha256:
            found.append(f"sha256 {self.sha256[:16]}... recorded, {other.sha256[:16]}... given")
        if self.architecture and other.architecture:
            for key in sorted(set(self.architecture) | set(other.architecture)):
                recorded, given = self.architecture.get(key), other.architecture.get(key)
                if recorded != given:
                    found.append(f"{key} {recorded} recorded, {given} given")
        return found


def looks_like_path(name: str) -> bool:
    """Whether a recorded backbone name is a machine path (written by older versions).

    Registered names contain "/" too ("ViT-L/14@336px"), so only absolute paths, home
    paths and names of existing files count.
    """
    if not name:
        return False
    if name.startswith(("~", *_PATH_SEPARATORS)) or (len(name) > 2 and name[1] == ":"):
        return True
    return Path(name).suffix.lower() in {".pt", ".pth", ".bin", ".safetensors", ".ckpt"} and any(
        sep in name for sep in _PATH_SEPARATORS
    )


def display_name(path_or_name: str) -> str:
    """The name recorded for weights given as a file: the file's name, not its folder."""
    path = Path(path_or_name).expanduser()
    return path.name if path.exists() else str(path_or_name)
