"""What every method's reference (few-shot) mode shares, importing no method.

A reference mode compares each image with a bank made from a few known-good images.
How a bank is made and used is the method's own (``methods/<name>/few_shot.py``); the
error type, decoding the references, comparing a bank's recorded identity with a
model's, and where a calibrated checkpoint keeps its bank are the same for all.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

    from anomalyclip.preprocess import ImageSource

__all__ = [
    "BANK_DTYPES",
    "ReferenceError",
    "bank_dtype",
    "bank_path_for",
    "identity_differences",
    "load_references",
]

# How a bank may be stored: float16 halves the file; distances are computed in float32.
BANK_DTYPES = ("float32", "float16")


class ReferenceError(ValueError):
    """References that cannot be used: none, unreadable, or made for another model."""


def identity_differences(recorded: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """What differs between the settings a bank was made with and a model's, one
    ``key: bank X, model Y`` per setting."""
    return [
        f"{key}: bank {recorded.get(key)!r}, model {value!r}"
        for key, value in expected.items()
        if recorded.get(key) != value
    ]


def load_references(references: Sequence[ImageSource]) -> list[Image.Image]:
    """The decoded references; none, or one unreadable, is a :class:`ReferenceError`
    naming the file."""
    from anomalyclip.preprocess import load_image

    if not references:
        raise ReferenceError("no reference images given")
    images = []
    for source in references:
        try:
            images.append(load_image(source))
        except ValueError as error:
            raise ReferenceError(f"reference {error}") from None
    return images


def bank_path_for(checkpoint: str | Path) -> Path:
    """Where ``calibrate --reference`` writes the bank: beside the checkpoint."""
    return Path(checkpoint).with_suffix(".bank.pt")


def bank_dtype(name: str) -> str:
    """``name`` when it is a storage dtype of banks, else a ValueError listing them."""
    if name not in BANK_DTYPES:
        raise ValueError(f"bank dtype must be one of {', '.join(BANK_DTYPES)}, got {name!r}")
    return name
