"""Test images as data URLs for the GPU probes: random noise (incompressible) and photo-like."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def _data_url(img: Image.Image, fmt: str) -> str:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=90)
    else:
        img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def png_data_url(width: int, height: int, seed: int) -> str:
    """Random noise as PNG: the worst case for payload size (a 1080p one is ~6 MB)."""
    rng = np.random.default_rng(seed)
    return _data_url(Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)), "PNG")


def photo_data_url(width: int, height: int, seed: int) -> str:
    """A photo-like JPEG (smooth gradients, mild noise): compresses like a real photo, unique per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * rng.uniform(0.05, 0.3) + y * rng.uniform(0.05, 0.3) + c * 60) % 256 for c in range(3)], -1)
    img = Image.fromarray((base + rng.normal(0, 4, base.shape)).clip(0, 255).astype(np.uint8))
    return _data_url(img, "JPEG")


def page_data_url(width: int, height: int, seed: int) -> str:
    """A document-page-like PNG: white page, dark text lines of varying length, unique per seed."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    margin, line_h = width // 12, max(height // 60, 4)
    y = margin
    while y < height - margin:
        x = margin
        while x < width - margin:
            w = int(rng.integers(line_h, 6 * line_h))
            draw.rectangle([x, y, min(x + w, width - margin), y + line_h // 2], fill=(30, 30, 30))
            x += w + line_h
        y += int(line_h * rng.uniform(1.4, 2.2))
    return _data_url(img, "PNG")


# ----- hostile images (benchmarks/soak.py): what a careless or hostile client sends ---------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import zlib

    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A decompression bomb: a valid 1-bit greyscale PNG of width x height (400 Mpx by default, over
    twice PIL's MAX_IMAGE_PIXELS) whose file is ~50 KB, built with zlib in well under a second."""
    import zlib

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte 0, then all-black pixels
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])  # depth 1, grey
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def image_bytes(width: int, height: int, seed: int, fmt: str = "PNG") -> bytes:
    """Random pixels encoded as PNG or JPEG: an ordinary image of any shape (28 x 8000 included)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def bytes_data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()
