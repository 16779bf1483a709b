"""Opening image files with Pillow: the one guarded path every read of a file takes.

Pillow's plugins raise whatever their parsers meet in a damaged file (``TypeError`` from
a TIFF tag of the wrong type, ``NotImplementedError`` from a DDS pixel format,
``RuntimeError`` from libavif, ...), at open, at load, or lazily afterwards (EXIF,
``convert``). :func:`open_image` is the only place the package calls ``Image.open``;
whatever is raised inside its block becomes that file's :class:`ImageLoadError`, so a
batch skips the file by name and the service answers 4xx, never 500.

Before any pixel is decoded the header's geometry is checked against
:class:`DecodeSettings`: the pixel count (a decompression bomb), the longest side and
the aspect ratio. A 77 KB PNG of 1 x 40,000,000 pixels is under any sensible pixel
count, yet resizing it builds a filter table of gigabytes; the side and aspect limits
refuse it from its header. The settings are set for a block of work with
:func:`decoding` (the CLI's ``--max-megapixels``, ``--max-side``, ``--max-aspect``).

A caller that needs only a small image (``needed``: the model's input side) gets a JPEG
many times larger decoded at 1/2, 1/4 or 1/8 scale by libjpeg (``Image.draft``), still at
least :data:`DRAFT_MARGIN` times the side needed: a quarter of the decoding time and a
sixteenth of the memory, within two grey levels of a full decode after resizing.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 178_956_970  # twice PIL's warning limit: beyond it a file is a bomb
# JPEG's own largest side; a longer side is an elongated bomb (its resize costs gigabytes).
DEFAULT_MAX_SIDE = 65_535
# Line-scan strips scored in tiles (--tile-size) stay well inside 100:1.
DEFAULT_MAX_ASPECT = 100.0
# A draft-decoded JPEG keeps at least this many times the side the caller needs.
DRAFT_MARGIN = 4
# The info key under which an image decoded at reduced scale keeps its size in the file.
ORIGINAL_SIZE = "anomalyclip.original_size"
# Formats never opened: EPS is rendered by running Ghostscript on the file's program.
REFUSED_FORMATS = frozenset({"EPS"})
# The one list of what counts as an image file when folders are searched.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})

ErrorKind = Literal["missing", "unsupported", "too-large", "corrupt"]


class ImageLoadError(ValueError):
    """An image that cannot be used, with the file it came from and why.

    ``kind`` sorts the reasons for callers that answer differently (the service: 415 for
    ``unsupported``, 413 for ``too-large``, 422 otherwise).
    """

    def __init__(self, source: object, reason: str, kind: ErrorKind = "corrupt") -> None:
        self.source = str(source)
        self.reason = reason
        self.kind: ErrorKind = kind
        super().__init__(f"cannot read image {self.source}: {reason}")

    def __reduce__(self) -> tuple[type[ImageLoadError], tuple[str, str, ErrorKind]]:
        return ImageLoadError, (self.source, self.reason, self.kind)


class RunDepth:
    """The bit depth of a run's 16-bit data, decided once from its first such image.

    Guessing per image hides exposure faults: an under-exposed 12-bit frame reads as
    10-bit and is brightened 4x to look like its neighbours. One depth per run (a
    :func:`decoding` block), said once, keeps frames of one camera comparable.
    """

    def __init__(self) -> None:
        self.bits: int | None = None
        self.decided_by = ""
        self.clipped_said = False


@dataclass(frozen=True)
class DecodeSettings:
    """How files are decoded where no caller says otherwise: the bit depth of 16-bit data
    (None: detected per image) and the limits on the header's geometry.

    Set for a block of work with :func:`decoding`, so that every path that reads images
    (predict, test, calibrate, datasets) follows it without each one passing it along.
    """

    bit_depth: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_side: int = DEFAULT_MAX_SIDE
    max_aspect: float = DEFAULT_MAX_ASPECT
    # inside a :func:`decoding` block: the depth detected once for the whole run
    run_depth: RunDepth | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.bit_depth is not None and not 8 <= self.bit_depth <= 16:
            raise ValueError(f"bit depth must be from 8 to 16, got {self.bit_depth}")
        if self.max_pixels < 1:
            raise ValueError(f"the pixel limit must be positive, got {self.max_pixels}")
        if self.max_side < 1:
            raise ValueError(f"the side limit must be positive, got {self.max_side}")
        if not self.max_aspect >= 1.0:
            raise ValueError(f"the aspect-ratio limit must be at least 1, got {self.max_aspect}")

    def size_problem(self, width: int, height: int) -> str | None:
        """Why an image of this size is refused, or None: pixels, side, aspect ratio."""
        if width < 1 or height < 1:
            return f"image has no pixels ({width}x{height})"
        if width * height > self.max_pixels:
            return (
                f"{width}x{height} = {width * height:,} pixels, over the limit of "
                f"{self.max_pixels:,}"
            )
        if max(width, height) > self.max_side:
            return f"{width}x{height} pixels, a side over the limit of {self.max_side:,}"
        aspect = max(width, height) / min(width, height)
        if aspect > self.max_aspect:
            return (
                f"{width}x{height} pixels, an aspect ratio of {aspect:,.0f}:1, over the limit "
                f"of {self.max_aspect:g}:1"
            )
        return None

    def check_size(self, name: str, size: tuple[int, int]) -> None:
        """Raise the file's :class:`ImageLoadError` when :meth:`size_problem` finds one."""
        problem = self.size_problem(*size)
        if problem is not None:
            raise ImageLoadError(name, problem, "too-large" if min(size) > 0 else "corrupt")


_DECODING: ContextVar[DecodeSettings] = ContextVar(
    "decoding",
    default=DecodeSettings(),  # noqa: B039 - frozen, never mutated
)


def current_settings() -> DecodeSettings:
    """The settings of the innermost :func:`decoding` block (the defaults outside one)."""
    return _DECODING.get()


@contextmanager
def decoding(
    bit_depth: int | None = None,
    max_pixels: int | None = None,
    max_side: int | None = None,
    max_aspect: float | None = None,
) -> Iterator[None]:
    """Decode with these settings inside the block (this thread and its context); a limit
    not given keeps its default. The block is one run: without ``bit_depth`` the depth of
    16-bit data is detected from the first such image and applied to all (:class:`RunDepth`)."""
    settings = DecodeSettings(
        bit_depth,
        DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels,
        DEFAULT_MAX_SIDE if max_side is None else max_side,
        DEFAULT_MAX_ASPECT if max_aspect is None else max_aspect,
        RunDepth(),
    )
    token = _DECODING.set(settings)
    try:
        yield
    finally:
        _DECODING.reset(token)


@contextmanager
def decoding_as(settings: DecodeSettings) -> Iterator[None]:
    """The block decodes with ``settings`` as they are: a worker thread decoding for a
    run (threads do not inherit the caller's context) keeps its depth and limits."""
    token = _DECODING.set(settings)
    try:
        yield
    finally:
        _DECODING.reset(token)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 200 else text[:197] + "..."


@contextmanager
def guarded(name: str) -> Iterator[None]:
    """Any exception inside the block becomes the file's :class:`ImageLoadError`.

    Pillow's warnings are silenced: its decompression-bomb warning (the settings are the
    limit) and "corrupt EXIF" and the like (the file decoded, or its error says why).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", module=r"PIL\.")
            yield
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(name, "not a recognised image format", "unsupported") from None
    except Image.DecompressionBombError as error:
        reason = f"over Pillow's decompression-bomb limit ({_one_line(error)})"
        raise ImageLoadError(name, reason, "too-large") from None
    except MemoryError:
        reason = "too large to decode in the memory available"
        raise ImageLoadError(name, reason, "too-large") from None
    except FileNotFoundError:
        raise ImageLoadError(name, "no such file", "missing") from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise ImageLoadError(name, f"corrupt or truncated image ({_one_line(error)})") from None
    except Exception as error:  # noqa: BLE001 - any decoder failure is this file's error
        kind = type(error)
        where = "" if kind.__module__ == "builtins" else f"{kind.__module__}."
        reason = f"cannot decode ({where}{kind.__qualname__}: {_one_line(error)})"
        raise ImageLoadError(name, reason) from None


def openable_formats() -> list[str]:
    """Every format this Pillow opens, less :data:`REFUSED_FORMATS`."""
    Image.init()
    return [name for name in Image.ID if name not in REFUSED_FORMATS]


@contextmanager
def open_image(
    source: str | Path | bytes,
    name: str | None = None,
    settings: DecodeSettings | None = None,
    needed: int | None = None,
) -> Iterator[Image.Image]:
    """The file's image, opened lazily (header only) and its geometry checked.

    Inside the block, anything raised (by ``load``, ``convert``, EXIF parsing, ...) is
    the file's :class:`ImageLoadError`. ``needed``: the smallest side the caller will
    use; a JPEG more than twice :data:`DRAFT_MARGIN` times larger is decoded reduced.
    """
    if name is None:
        name = f"<{len(source)} bytes>" if isinstance(source, bytes) else str(source)
    settings = settings if settings is not None else current_settings()
    with guarded(name):
        handle: IO[bytes]
        if isinstance(source, bytes):
            handle = io.BytesIO(source)
        else:
            path = Path(source)
            if not path.is_file():
                raise ImageLoadError(name, "no such file", "missing")
            if path.stat().st_size == 0:
                raise ImageLoadError(name, "the file is empty (0 bytes)")
            handle = path.open("rb")
        with handle, Image.open(handle, formats=openable_formats()) as image:
            settings.check_size(name, image.size)
            if needed is not None and image.format in ("JPEG", "MPO"):
                target = needed * DRAFT_MARGIN
                if min(image.size) >= 2 * target:
                    image.info[ORIGINAL_SIZE] = image.size
                    image.draft(None, (target, target))
            yield image
