"""Reading images and masks, and turning them into a model's input tensors.

:class:`PreProcessor` is the one place images become tensors; it travels with every model
(built from the configuration) and knows the geometry both ways: image to input, mask to
model resolution, map back onto the original image. Two resize modes exist:

* ``squash`` (AnomalyCLIP's): bicubic resize of the whole image to S x S, no crop.
* ``center-crop`` (open_clip's evaluation transform, which MuSc uses): bicubic resize of
  the shorter side to S, centre crop S x S. A map covers the crop only; outside it the
  map placed on the original holds the map range's low end ("nothing seen here").

Both then take RGB in [0, 1] and normalise with the mean and std. Masks: > 0, bilinear
resize, > 0.5.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from PIL import Image, ImageOps

from anomalyclip.decoding import (
    DEFAULT_MAX_PIXELS,
    DRAFT_MARGIN,
    IMAGE_EXTENSIONS,
    ORIGINAL_SIZE,
    DecodeSettings,
    ImageLoadError,
    RunDepth,
    current_settings,
    decoding,
    guarded,
    open_image,
)
from anomalyclip.input_settings import CLIP_MEAN, CLIP_STD, RESIZE_MODES, ResizeMode
from anomalyclip.png_reduced import decode_png_reduced

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "RESIZE_MODES",
    "DecodeSettings",
    "ImageLoadError",
    "ImageSource",
    "PreProcessor",
    "ResizeMode",
    "decoding",
    "describe",
    "load_image",
    "load_mask_array",
    "resize_mask",
    "used_bit_depth",
]

logger = logging.getLogger(__name__)

ImageSource = str | Path | bytes | Image.Image | np.ndarray


def describe(source: ImageSource) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    if isinstance(source, np.ndarray):
        return f"<array {source.shape} {source.dtype}>"
    return f"<{type(source).__name__}>"


def used_bit_depth(peak: float) -> int:
    """The bit depth a 16-bit container's data uses, from its largest value.

    Industrial cameras write 10-, 12- or 14-bit data into 16-bit files; dividing 12-bit
    data by 65535 scores a near-black image. The depth is the smallest even number of
    bits (at least 8) that holds the peak: 4095 is 12-bit, 4096 is 14-bit.
    """
    bits = max(8, int(np.ceil(np.log2(peak + 1.0))))
    return min(16, bits + bits % 2)


def _to_8bit(image: Image.Image, name: str = "") -> Image.Image:
    """16-bit and float images scaled to 8 bits instead of clipped, as PIL's convert would.

    Integer images are scaled by the depth :func:`decoding` sets (values above it are
    clipped, with a warning); else, inside a run (a :func:`decoding` block), by the depth
    the run's first 16-bit image uses (:func:`used_bit_depth`), said once and applied to
    all; outside one, by the depth each image's data uses, with a warning when not 16.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = float(array.max(initial=0))
        settings = current_settings()
        if settings.bit_depth is not None:
            if top > 2**settings.bit_depth - 1:
                logger.warning(
                    "image data up to %d exceeds the %d-bit depth given: clipped",
                    int(top),
                    settings.bit_depth,
                )
            bits = settings.bit_depth
        elif settings.run_depth is not None:
            bits = _run_bits(settings.run_depth, image.mode, top, name)
        else:
            bits = used_bit_depth(top)
            if bits < 16 and (image.mode.startswith("I;16") or top > 255):
                logger.warning(
                    "%d-bit image data in a 16-bit file (largest value %d): scaled as %d-bit",
                    bits,
                    int(top),
                    bits,
                )
        peak = float(2**bits - 1)
        return Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "F":
        with np.errstate(invalid="ignore"):  # a signalling NaN in the file
            array = np.asarray(image, dtype=np.float64)
        finite = np.isfinite(array)
        low = float(array.min(initial=0, where=finite))
        high = float(array.max(initial=0, where=finite))
        # NaN reads as the lowest value, infinities as the extremes
        array = np.where(finite, array, np.where(array == np.inf, high, low))
        if low >= 0.0 and high <= 1.0:
            scaled = array * 255.0
        else:
            scaled = (array - low) / max(high - low, 1e-12) * 255.0
        return Image.fromarray(np.clip(scaled + 0.5, 0, 255).astype(np.uint8), "L")
    return image


def _run_bits(run: RunDepth, mode: str, top: float, name: str) -> int:
    """The run's depth: decided by its first 16-bit image and said once; a later image
    with values above it is clipped, said once too (an exposure fault, or a wrong guess)."""
    if not (mode.startswith("I;16") or top > 255):
        return 8  # 8-bit data in a 32-bit integer image: not a 16-bit camera's
    if run.bits is None:
        run.bits = used_bit_depth(top)
        run.decided_by = name
        logger.warning(
            "%d-bit image data in a 16-bit file (%s, largest value %d): every 16-bit image "
            "of this run is scaled as %d-bit (--bit-depth sets it)",
            run.bits,
            name or "the first 16-bit image",
            int(top),
            run.bits,
        )
    elif top > 2**run.bits - 1 and not run.clipped_said:
        run.clipped_said = True
        logger.warning(
            "%s has values up to %d, over the run's %d-bit depth (decided from %s): clipped; "
            "pass --bit-depth if the camera's depth is higher",
            name,
            int(top),
            run.bits,
            run.decided_by,
        )
    return run.bits


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"array of shape {array.shape} is not an image (H, W[, 1|3|4])")
    if array.dtype != np.uint8:
        array = np.asarray(array, dtype=np.float64)
        if array.max(initial=0) > 1.0:
            array = array / (65535.0 if array.max() > 255 else 255.0)
        array = np.clip(array * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def load_image(
    source: ImageSource, max_pixels: int | None = None, needed: int | None = None
) -> Image.Image:
    """An RGB PIL image from a path, bytes, PIL image or array; EXIF orientation applied.

    Raises :class:`ImageLoadError` naming the source for anything unreadable: whatever a
    decoder raises on a damaged file (Pillow's plugins raise ``TypeError``,
    ``NotImplementedError`` and more) is that file's error, never the caller's crash.
    A file's geometry is checked from its header before decoding, against the settings
    :func:`decoding` sets (``max_pixels`` overrides the pixel limit). ``needed``: the
    smallest side the caller uses (a model's input); a JPEG many times larger is decoded
    at a reduced scale (:func:`anomalyclip.decoding.open_image`), an 8-bit PNG a strip
    at a time and reduced by an integer factor, keeping at least :data:`DRAFT_MARGIN`
    times ``needed`` (:func:`anomalyclip.png_reduced.decode_png_reduced`: the pixels of
    the full decode reduced, in the memory of one strip).
    """
    name = describe(source)
    settings = current_settings()
    if max_pixels is not None:
        settings = dataclasses.replace(settings, max_pixels=max_pixels)
    if isinstance(source, (str, Path, bytes)):
        with open_image(source, name, settings, needed) as image:
            factor = png_reduction(image, needed)
            reduced = _png_reduced(source, factor, name) if factor > 1 else None
            if reduced is not None:  # never turned: EXIF sends a PNG to the full decode
                reduced.info[ORIGINAL_SIZE] = image.size
                return reduced
            drafted = image.info.get(ORIGINAL_SIZE)  # a JPEG decoded at 1/2 to 1/8
            decoded_size = image.size
            image.load()
            settings.check_size(name, image.size)  # a plugin may pick another size at load
            result = _as_rgb(image, name)
            if drafted is not None:  # its size in the file, turned as the image was
                turned = result.size != decoded_size
                result.info[ORIGINAL_SIZE] = drafted[::-1] if turned else drafted
            return result
    with guarded(name):
        return _as_rgb(_from_array(source) if isinstance(source, np.ndarray) else source, name)


def png_reduction(image: Image.Image, needed: int | None) -> int:
    """The factor a PNG of this size is reduced by when ``needed`` is the smallest side
    used: the largest that keeps :data:`DRAFT_MARGIN` times it (1: decoded in full, as
    every image under twice that is, where the saving is small)."""
    if needed is None or image.format != "PNG" or min(image.size) < 2 * needed * DRAFT_MARGIN:
        return 1
    return min(image.size) // (needed * DRAFT_MARGIN)


def _png_reduced(source: str | Path | bytes, factor: int, name: str) -> Image.Image | None:
    """The PNG reduced by ``factor``, or None where its layout needs the full decode."""

    def convert(strip: Image.Image) -> Image.Image:
        return _as_rgb(strip, name)

    if isinstance(source, bytes):
        return decode_png_reduced(io.BytesIO(source), factor, convert)
    with Path(source).open("rb") as handle:
        return decode_png_reduced(handle, factor, convert)


EXIF_ORIENTATION = 0x0112


def original_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the image in its file, upright: a reduced decode's records it."""
    size = image.info.get(ORIGINAL_SIZE, image.size)
    return int(size[0]), int(size[1])


def _as_rgb(image: Image.Image, name: str) -> Image.Image:
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        # only then: without a turn to make, exif_transpose returns a copy (537 MB more
        # for a 13,376 x 13,376 RGB image)
        image = ImageOps.exif_transpose(image)
    image = _to_8bit(image, name)
    if image.mode != "RGB":
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (0, 0, 0, 255))
            image = Image.alpha_composite(background, image)
        image = image.convert("RGB")
    if min(image.size) < 1:
        raise ImageLoadError(name, f"image has no pixels ({image.size})")
    return image


def load_mask_array(path: str | Path) -> np.ndarray:
    """Binary mask (H, W) bool at its own resolution: any non-zero pixel is anomalous."""
    if not Path(path).is_file():
        raise ImageLoadError(path, "mask file not found", "missing")
    with open_image(path) as mask:
        return np.asarray(_to_8bit(mask).convert("L")) > 0


def resize_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """(size, size) float32 in {0, 1}, as the original's training step sees it."""
    as_image = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    resized = np.asarray(as_image.resize((size, size), Image.Resampling.BILINEAR), np.float32)
    return torch.from_numpy((resized / 255.0 > 0.5).astype(np.float32))


@dataclass(frozen=True)
class PreProcessor:
    """Images to input tensors and back, for one input size, resize mode and normalisation."""

    size: int
    resize: ResizeMode = "squash"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(
                f"resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}"
            )
        if self.size <= 0:
            raise ValueError(f"size must be positive, got {self.size}")

    def resized_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) of the image after resizing, before any crop."""
        if self.resize == "squash":
            return self.size, self.size
        width, height = size
        if width <= height:
            return self.size, int(self.size * height / width)
        return int(self.size * width / height), self.size

    def crop_box(self, size: tuple[int, int]) -> tuple[int, int]:
        """(left, top) of the S x S crop in the resized image (open_clip's rounding)."""
        width, height = self.resized_size(size)
        return int(round((width - self.size) / 2.0)), int(round((height - self.size) / 2.0))

    def tensor(self, image: Image.Image) -> torch.Tensor:
        """(3, S, S) float32 for one RGB image."""
        resized = image.resize(self.resized_size(image.size), Image.Resampling.BICUBIC)
        if self.resize == "center-crop":
            left, top = self.crop_box(image.size)
            resized = resized.crop((left, top, left + self.size, top + self.size))
        array = np.asarray(resized, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array).permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (tensor - mean) / std

    def __call__(self, images: Sequence[ImageSource] | ImageSource) -> torch.Tensor:
        """A batch (B, 3, S, S) from any image sources."""
        if not isinstance(images, (list, tuple)):
            # anything but a list or tuple is one source (a str too, though it is a Sequence)
            images = [cast(ImageSource, images)]
        return torch.stack([self.load(item) for item in images])

    def load(self, source: ImageSource) -> torch.Tensor:
        """(3, S, S) float32 for one image source, decoded no larger than needed.

        A JPEG at least 8 S on its shorter side is decoded at 1/2 to 1/8 scale, keeping
        4 S or more (:func:`anomalyclip.decoding.open_image`): after the resize to S it
        differs from a full decode by at most 1% of the range (0.06% on average); any
        smaller image is decoded in full, unchanged.
        """
        return self.tensor(load_image(source, needed=self.size))

    def mask(self, mask: np.ndarray) -> torch.Tensor:
        """(S, S) float32 in {0, 1}: a boolean mask of the original image at model resolution."""
        if self.resize == "squash":
            return resize_mask(mask, self.size)
        height, width = mask.shape
        as_image = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
        resized = as_image.resize(self.resized_size((width, height)), Image.Resampling.BILINEAR)
        left, top = self.crop_box((width, height))
        cropped = np.asarray(resized.crop((left, top, left + self.size, top + self.size)))
        return torch.from_numpy((cropped.astype(np.float32) / 255.0 > 0.5).astype(np.float32))

    def load_mask(self, path: str | Path | None) -> torch.Tensor:
        """A mask file at model resolution; None (a normal image) gives all zeros."""
        if path is None:
            return torch.zeros(self.size, self.size)
        return self.mask(load_mask_array(path))

    def map_from_original(self, anomaly_map: np.ndarray) -> np.ndarray:
        """(S, S) float32: a map of the original image placed at model resolution as the
        images and masks are (bilinear; the crop of a crop mode), so a map made another
        way (tiles stitched on the original) is evaluated against the same mask pixels."""
        from anomalyclip.maps import upsample

        array = torch.from_numpy(np.ascontiguousarray(anomaly_map, dtype=np.float32))
        height, width = array.shape
        if self.resize == "squash":
            return upsample(array[None], (self.size, self.size))[0].numpy()
        resized_width, resized_height = self.resized_size((width, height))
        left, top = self.crop_box((width, height))
        resized = upsample(array[None], (resized_height, resized_width))[0]
        return resized[top : top + self.size, left : left + self.size].numpy()

    def map_to_original(
        self, anomaly_map: np.ndarray, size: tuple[int, int], fill: float = 0.0
    ) -> np.ndarray:
        """(height, width) float32: a model-resolution map placed on the original image.

        ``size`` is the original (width, height). Bilinear throughout; with a centre crop
        the area outside the crop holds ``fill``.
        """
        from anomalyclip.maps import upsample

        array = torch.from_numpy(np.ascontiguousarray(anomaly_map, dtype=np.float32))
        width, height = size
        if self.resize == "center-crop":
            resized_width, resized_height = self.resized_size(size)
            left, top = self.crop_box(size)
            canvas = torch.full((resized_height, resized_width), float(fill))
            canvas[top : top + self.size, left : left + self.size] = array
            array = canvas
        if tuple(array.shape) == (height, width):
            return array.numpy()
        return upsample(array[None], (height, width))[0].numpy()
