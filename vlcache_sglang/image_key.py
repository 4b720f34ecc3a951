"""Image keys: a secret-keyed MAC over an image's raw encoded bytes, the settings that shape its
tokens, and the request's cache namespace.

The key is taken *before* decoding, so a hit can skip decode, resize, normalisation, SGLang's
SHA-256 pixel hash and the vision encoder. Everything that changes the image's tokens (model id,
processor min/max pixels, ...) is folded in, so the same bytes under other settings never collide.

Why keyed: the key is the identity of cached pixels, encoder output and KV. An unkeyed fast hash
(xxh3 with its public default secret) lets a client build two different images with the same key
and poison what others are served (REVIEW F1). HMAC-SHA256 under a per-process random secret is a
PRF: without the secret nobody can find, or even check, a collision offline. Only the tokenizer
process computes keys (the scheduler reads them off the request's items), so a per-process secret
is enough; keys do not survive a restart, which the caches do not either. Cost on a 20 MB payload
(AMD EPYC with SHA-NI, this repo's dev machine): HMAC-SHA256 ~14 ms, keyed BLAKE2b ~28 ms,
xxh3-128 ~1 ms (README "Safety").

The namespace is the request's cache salt (SGLang's `extra_key`: cache_salt ‖ extra_key): the same
image under two salts gets two keys, so no cache of ours is shared across tenants (a hit would be
a timing oracle even where the cached value is the same).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Optional, Union

import pybase64

from vlcache_sglang.local_images import read_local_image

BytesLike = Union[bytes, bytearray, memoryview]

# Attribute of a MultimodalDataItem keyed by us: the key again, so the scheduler can tell our keys
# from hashes a client supplied (`mm_hashes`) or SGLang computed (64-bit, unkeyed).
KEY_ATTR = "vlcache_key"

# Per-process key of the MAC (see the module docstring).
_SECRET = os.urandom(32)


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
        # Only 30 bits: pad aliasing across images is stock SGLang's (REVIEW F13, not fixed here).
        return 1_000_000 + self.value % (1 << 30)


def _hasher(settings: ProcessorSettings, namespace: Optional[str]) -> "hmac.HMAC":
    h = hmac.new(_SECRET, digestmod=hashlib.sha256)
    prefix = settings.canonical_bytes()
    ns = b"\x00" if namespace is None else b"\x01" + namespace.encode("utf-8", "surrogatepass")
    # Length-prefix settings and namespace so no (settings, namespace, payload) triple aliases another.
    for part in (prefix, ns):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h


def _key(h: "hmac.HMAC") -> ImageKey:
    return ImageKey(int.from_bytes(h.digest()[:16], "little"))


def image_key_from_bytes(data: BytesLike, settings: ProcessorSettings, namespace: Optional[str] = None) -> ImageKey:
    """Key of an encoded image held in memory. Hashes the buffer in place (no copy)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"image bytes must be bytes, bytearray or memoryview, got {type(data).__name__}")
    h = _hasher(settings, namespace)
    h.update(data)
    return _key(h)


def decode_base64(data: Union[str, bytes]) -> bytes:
    """The payload of a base64 image (optionally a `data:` URL), exactly as strict as SGLang's
    `get_image_bytes` (`validate=True`): a junk character is a ValueError whether or not the image
    is cached, so the answer is the same either way (REVIEW F11)."""
    if isinstance(data, str) and data.startswith("data:"):
        _, sep, data = data.partition(",")
        if not sep:
            raise ValueError("malformed data URL: expected 'data:<mime>;base64,<payload>'")
    try:
        return pybase64.b64decode(data, validate=True)  # the one copy of the payload
    except (ValueError, TypeError) as e:  # binascii.Error and non-ASCII text are ValueErrors
        raise ValueError(f"image payload is not valid base64: {e}") from e


def image_key_from_base64(data: Union[str, bytes], settings: ProcessorSettings,
                          namespace: Optional[str] = None) -> ImageKey:
    """Key of a base64 image (optionally a `data:image/...;base64,` URL). Decodes exactly once."""
    return image_key_from_bytes(decode_base64(data), settings, namespace)


def image_key_from_file(path: Union[str, os.PathLike], settings: ProcessorSettings,
                        namespace: Optional[str] = None) -> ImageKey:
    """Key of an image file (blocking; the same key as its bytes in memory)."""
    return image_key_from_bytes(read_local_image(os.fspath(path)), settings, namespace)
