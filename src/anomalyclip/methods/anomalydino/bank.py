"""AnomalyDINO's memory bank: the DINOv2 patch features of the known-good references.

Built once from the references (each rotated to the 8 angles when rotation is on, never
masked, as the authors' evaluation builds it) and reused for every test image; saved so
that a line of inspection does not re-encode its references at start-up. A bank holds
unit vectors in reference, angle and row-major patch order. A file is validated on load
(format, types, shapes, dtypes, finite values, unit norms): a damaged bank would score
every patch wrongly without any error.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from anomalyclip.utils.atomic import atomic_open
from anomalyclip.utils.safe_load import refuse_non_finite, safe_torch_load

__all__ = ["BANK_FORMAT", "BANK_VERSION", "AnomalyDINOBank", "BankError"]

logger = logging.getLogger(__name__)

BANK_FORMAT = "anomalyclip-anomalydino-bank"
BANK_VERSION = 1
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# float16 storage rounds each component by up to 2^-11 relative: norms stay within 1e-3
NORM_TOLERANCE = 1e-2


class BankError(ValueError):
    """A bank that cannot be used: none, damaged, or made for another model."""


@dataclass
class AnomalyDINOBank:
    """Unit patch features of the references, and what made them.

    ``patches``: patches per bank image (reference x angle), in bank order; their sum is
    the number of rows. ``identity``: backbone (name, SHA-256, architecture) and image
    size: features of another backbone or size are not comparable.
    """

    features: Tensor  # (rows, D), L2-normalised; float32 or float16
    patches: list[int]
    angles: tuple[int, ...]
    identity: dict[str, Any]
    sources: list[str]
    digest: str

    @property
    def count(self) -> int:
        return len(self.sources)

    @property
    def size(self) -> int:
        return int(self.features.shape[0])

    @classmethod
    def from_features(
        cls,
        per_image: Sequence[Tensor],
        angles: Sequence[int],
        identity: dict[str, Any],
        sources: Sequence[str],
    ) -> AnomalyDINOBank:
        """A bank from each bank image's (n_i, D) features, normalised here."""
        features = torch.nn.functional.normalize(torch.cat(list(per_image)).float(), dim=-1)
        digest = hashlib.sha256(features.numpy().tobytes()).hexdigest()
        return cls(
            features,
            [len(f) for f in per_image],
            tuple(int(a) for a in angles),
            dict(identity),
            list(sources),
            digest,
        )

    def check_fits(self, identity: dict[str, Any]) -> None:
        """Refuse a bank made with another backbone or size, naming what differs."""
        differences = [
            f"{key}: bank {self.identity.get(key)!r}, model {value!r}"
            for key, value in identity.items()
            if self.identity.get(key) != value
        ]
        if differences:
            raise BankError(
                "the reference bank was made for another model (" + "; ".join(differences) + ")"
            )

    def save(self, path: str | Path, dtype: str = "float32") -> Path:
        """Written atomically; ``dtype`` "float16" halves the file (distances are computed
        in float32 all the same, and move by about 1e-4)."""
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
        target = Path(path)
        record = {
            "format": BANK_FORMAT,
            "version": BANK_VERSION,
            "features": self.features.to(STORAGE_DTYPES[dtype]).contiguous(),
            "patches": list(self.patches),
            "angles": list(self.angles),
            "identity": self.identity,
            "sources": self.sources,
            "digest": self.digest,
        }
        with atomic_open(target, "wb") as handle:
            torch.save(record, handle)
        logger.info("AnomalyDINO bank of %d patches written to %s", self.size, target)
        return target

    @classmethod
    def load(cls, path: str | Path) -> AnomalyDINOBank:
        """A saved bank, checked field by field; any problem is a :class:`BankError`
        naming the file and the field."""
        data = safe_torch_load(path, "AnomalyDINO bank")
        if not isinstance(data, dict) or data.get("format") != BANK_FORMAT:
            raise BankError(f"{path} is not an AnomalyDINO bank written by anomalyclip")
        if not isinstance(data.get("version"), int) or data["version"] > BANK_VERSION:
            raise BankError(f"{path}: bank version {data.get('version')!r} is not supported")
        try:
            bank = cls(
                _features(data.get("features")),
                _int_list(data.get("patches"), "patches"),
                tuple(_int_list(data.get("angles"), "angles")),
                _typed(data.get("identity"), dict, "identity"),
                [_typed(s, str, "sources") for s in _typed(data.get("sources"), list, "sources")],
                _typed(data.get("digest"), str, "digest"),
            )
            bank.validate()
        except ValueError as error:
            raise BankError(f"{path}: {error}") from None
        return bank

    def validate(self) -> None:
        """Shapes, counts, finite values and unit norms agree, or a ValueError says which."""
        refuse_non_finite({"features": self.features}, "")
        rows = self.size
        if sum(self.patches) != rows or min(self.patches, default=0) < 1:
            raise ValueError(f"patches {sum(self.patches)} do not add up to {rows} feature rows")
        if len(self.patches) != len(self.sources) * len(self.angles) or not self.sources:
            raise ValueError(
                f"{len(self.patches)} bank images for {len(self.sources)} references at "
                f"{len(self.angles)} angles"
            )
        norms = self.features.float().norm(dim=-1)
        worst = float((norms - 1).abs().max())
        if not math.isfinite(worst) or worst > NORM_TOLERANCE:
            raise ValueError(f"features are not unit vectors (norm off by {worst:.3g})")


def _features(value: Any) -> Tensor:
    if not isinstance(value, Tensor) or value.dim() != 2 or value.shape[0] < 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"features must be a 2-D tensor of patch rows, got {shape}")
    if value.dtype not in STORAGE_DTYPES.values():
        raise ValueError(f"features must be float32 or float16, got {value.dtype}")
    return value


def _int_list(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise ValueError(f"{name} must be a list of integers")
    return list(value)


def _typed(value: Any, kind: type, name: str) -> Any:
    if not isinstance(value, kind):
        raise ValueError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
    return value
