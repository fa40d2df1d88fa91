"""Encoded image bytes: decoding, re-encoding, and naming their format for shards and for HTTP."""

from __future__ import annotations

import base64
import io

from PIL import Image, UnidentifiedImageError

SHARD_FORMATS = {"png": "png", "jpeg": "jpg", "mpo": "jpg", "webp": "webp"}  # PIL's format -> shard extension


def load_image(data: bytes) -> Image.Image:
    """A PIL RGB image from encoded bytes; raises ValueError for corrupt data."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Image.DecompressionBombError as error:
        raise ValueError(f"image past PIL's decompression limit ({error})") from error
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"unreadable image ({error})") from error
    return image.convert("RGB")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_extension(data: bytes) -> str:
    """The shard extension of encoded image bytes; raises on bytes PIL cannot read."""
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
        fmt = (image.format or "").lower()
    if fmt not in SHARD_FORMATS:
        raise ValueError(f"image format {fmt!r} is not one the shards hold (png, jpg, webp)")
    return SHARD_FORMATS[fmt]


def image_mime(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    raise ValueError("image bytes are not PNG, JPEG or WebP")


def data_url(data: bytes) -> str:
    return f"data:{image_mime(data)};base64,{base64.b64encode(data).decode()}"
