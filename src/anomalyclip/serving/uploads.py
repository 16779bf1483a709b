"""Upload validation, free of HTTP: what is wrong with a file, as a domain error.

The checks here run before a file is queued for the model and read at most the image
header, so a decompression bomb is refused before it is decoded. They raise
:class:`UploadError` subclasses; the routes decide which HTTP status each one means, so
the same checks serve a single request (an error response) and a batch (one failed
entry among good ones).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fastapi import UploadFile

from anomalyclip.decoding import ImageLoadError, current_settings, open_image
from anomalyclip.serving.settings import ServiceSettings

ACCEPTED_OCTET_TYPES = ("application/octet-stream", "")
READABLE_FORMATS = "PNG, JPEG, BMP, TIFF, WebP"


class UploadError(Exception):
    """A file the service will not score; ``detail`` says why, naming the file."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class UploadTooLarge(UploadError):
    """Over a size limit: bytes, pixels, files per batch, or a decompression bomb."""


class UnsupportedUpload(UploadError):
    """Not an image, or not in a format the service reads."""


class InvalidUpload(UploadError):
    """An image that is empty, corrupt or truncated."""


class TooFewImages(UploadError):
    """A set too small for a method whose images score each other."""


@dataclass
class Upload:
    """A file as the client sent it; its name is only echoed back, never opened."""

    filename: str
    content_type: str
    data: bytes


def display_name(name: str | None) -> str:
    """The client's file name reduced to a printable base name, for messages only."""
    base = (name or "upload").replace("\\", "/").rsplit("/", 1)[-1]
    printable = "".join(ch for ch in base if ch.isprintable())
    return printable[:200] or "upload"


def check_upload(upload: Upload, settings: ServiceSettings) -> None:
    """Cheap checks before queueing: content type, emptiness, format and pixel count."""
    name = upload.filename
    content_type = upload.content_type.split(";")[0].strip().lower()
    if not (content_type.startswith("image/") or content_type in ACCEPTED_OCTET_TYPES):
        raise UnsupportedUpload(
            f"{name} was sent as {content_type}; upload an image ({READABLE_FORMATS})"
        )
    if not upload.data:
        raise InvalidUpload(f"{name} is empty (0 bytes)")
    header_size(upload, settings)


def header_size(upload: Upload, settings: ServiceSettings) -> tuple[int, int]:
    """(width, height) from the upload's header, within the service's pixel limit and the
    side and aspect-ratio limits; whatever the decoder raises is this upload's error."""
    limits = dataclasses.replace(current_settings(), max_pixels=settings.max_pixels)
    name = upload.filename
    try:
        with open_image(upload.data, name, limits) as image:
            return image.size
    except ImageLoadError as error:
        if error.kind == "unsupported":
            raise UnsupportedUpload(
                f"{name} is not an image in a format the service reads ({READABLE_FORMATS})"
            ) from None
        if error.kind == "too-large":
            raise UploadTooLarge(f"{name} is {error.reason}") from None
        raise InvalidUpload(f"{name}: {error.reason}") from None


def check_batch_size(count: int, settings: ServiceSettings) -> None:
    """Refuse a batch with more files than one request may carry."""
    if count > settings.max_batch_size:
        raise UploadTooLarge(f"{count} files in one batch; the limit is {settings.max_batch_size}")


def check_set(uploads: list[Upload], settings: ServiceSettings) -> None:
    """Refuse a set over the count or total-pixel limits, from the headers alone.

    A set is decoded whole before it is scored (its images score each other), so its
    total pixel count, not only each image's, bounds the memory it takes.
    """
    if len(uploads) > settings.max_set_size:
        raise UploadTooLarge(
            f"{len(uploads)} images in one set; the limit is {settings.max_set_size}"
        )
    total = 0
    for upload in uploads:
        width, height = header_size(upload, settings)
        total += width * height
    if total > settings.max_set_pixels:
        raise UploadTooLarge(
            f"the set's images hold {total:,} pixels together, over the limit of "
            f"{settings.max_set_pixels:,}"
        )


async def read_upload(file: UploadFile, settings: ServiceSettings) -> Upload:
    """The upload's bytes, refusing more than the per-file limit without reading it all.

    The spooled file is closed once read (its memory freed), not at the request's end: a
    streamed answer can last as long as its client takes to read it.
    """
    name = display_name(file.filename)
    try:
        data = await file.read(settings.max_upload_bytes + 1)
    finally:
        await file.close()
    if len(data) > settings.max_upload_bytes:
        raise UploadTooLarge(
            f"{name} is larger than the upload limit of {settings.max_upload_bytes:,} bytes"
        )
    return Upload(name, file.content_type or "", data)


async def accept_upload(file: UploadFile, settings: ServiceSettings) -> Upload:
    """:func:`read_upload` then :func:`check_upload`: a file ready to queue, or an error."""
    upload = await read_upload(file, settings)
    check_upload(upload, settings)
    return upload
