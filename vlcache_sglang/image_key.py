"""Image keys: xxh3-128 over an image's raw encoded bytes plus the settings that shape its tokens.

The key is taken *before* decoding, so a hit can skip decode, resize, normalisation, SGLang's
SHA-256 pixel hash and the vision encoder. Everything that changes the image's tokens (model id,
processor min/max pixels, ...) is folded in, so the same bytes under other settings never collide.
"""

from __future__ import annotations

import binascii
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Union

import xxhash

BytesLike = Union[bytes, bytearray, memoryview]

# Files are hashed in pieces of this size so a large image is never held twice in memory.
_FILE_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class ProcessorSettings:
    """What, besides the image bytes, decides an image's tokens (grid, count, values)."""

    model_id: str
    min_pixels: int
    max_pixels: int
    # Any further processor knobs that change tokens (e.g. patch size overrides), as sorted pairs.
    extra: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def canonical_bytes(self) -> bytes:
        """A stable byte encoding: the same settings always hash the same across processes."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class ImageKey:
    """128-bit image key. `value` is the integer form SGLang's multimodal items carry as `hash`."""

    value: int

    @property
    def hex(self) -> str:
        return f"{self.value:032x}"

    @property
    def pad_value(self) -> int:
        # Same formula as SGLang's MultimodalDataItem.set_pad_value, so keys can stand in for hashes.
        return 1_000_000 + self.value % (1 << 30)


def _hasher(settings: ProcessorSettings) -> "xxhash.xxh3_128":
    h = xxhash.xxh3_128()
    prefix = settings.canonical_bytes()
    # Length-prefix the settings so no (settings, payload) pair can alias another.
    h.update(len(prefix).to_bytes(8, "little"))
    h.update(prefix)
    return h


def image_key_from_bytes(data: BytesLike, settings: ProcessorSettings) -> ImageKey:
    """Key of an encoded image held in memory. Hashes the buffer in place (no copy)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"image bytes must be bytes, bytearray or memoryview, got {type(data).__name__}")
    h = _hasher(settings)
    h.update(data)
    return ImageKey(h.intdigest())


def image_key_from_base64(data: Union[str, bytes], settings: ProcessorSettings) -> ImageKey:
    """Key of a base64 image (optionally a `data:image/...;base64,` URL). Decodes exactly once."""
    if isinstance(data, str):
        if data.startswith("data:"):
            _, sep, data = data.partition(",")
            if not sep:
                raise ValueError("malformed data URL: expected 'data:<mime>;base64,<payload>'")
        data = data.encode("ascii")
    try:
        raw = binascii.a2b_base64(data)  # the one copy of the payload
    except binascii.Error as e:
        raise ValueError(f"image payload is not valid base64: {e}") from e
    return image_key_from_bytes(raw, settings)


def image_key_from_file(path: Union[str, os.PathLike], settings: ProcessorSettings) -> ImageKey:
    """Key of an image file, streamed in 1 MiB pieces."""
    h = _hasher(settings)
    with open(path, "rb") as f:
        buf = bytearray(_FILE_CHUNK_BYTES)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return ImageKey(h.intdigest())
