import base64
import os
import struct
import tracemalloc

import pytest
import xxhash

from vlcache_sglang.image_key import (
    ProcessorSettings,
    decode_base64,
    image_key_from_base64,
    image_key_from_bytes,
    image_key_from_file,
)

SETTINGS = ProcessorSettings(model_id="Qwen/Qwen2.5-VL-7B-Instruct", min_pixels=3136, max_pixels=12845056)
PAYLOAD = bytes(range(256)) * 97 + b"\x89PNG tail"


def test_same_bytes_same_key():
    assert image_key_from_bytes(PAYLOAD, SETTINGS) == image_key_from_bytes(bytes(PAYLOAD), SETTINGS)
    assert image_key_from_bytes(bytearray(PAYLOAD), SETTINGS) == image_key_from_bytes(memoryview(PAYLOAD), SETTINGS)


@pytest.mark.parametrize("pos", [0, 1, len(PAYLOAD) // 2, len(PAYLOAD) - 1])
def test_one_changed_byte_changes_key(pos):
    changed = bytearray(PAYLOAD)
    changed[pos] ^= 0x01
    assert image_key_from_bytes(changed, SETTINGS) != image_key_from_bytes(PAYLOAD, SETTINGS)


@pytest.mark.parametrize(
    "other",
    [
        ProcessorSettings("Qwen/Qwen2.5-VL-3B-Instruct", 3136, 12845056),
        ProcessorSettings(SETTINGS.model_id, 3137, 12845056),
        ProcessorSettings(SETTINGS.model_id, 3136, 1003520),
        ProcessorSettings(SETTINGS.model_id, 3136, 12845056, extra=(("patch_size", "16"),)),
    ],
)
def test_changed_setting_changes_key(other):
    assert image_key_from_bytes(PAYLOAD, other) != image_key_from_bytes(PAYLOAD, SETTINGS)


def test_truncation_changes_key():
    assert image_key_from_bytes(PAYLOAD[:-1], SETTINGS) != image_key_from_bytes(PAYLOAD, SETTINGS)


def test_base64_file_and_bytes_agree(tmp_path):
    want = image_key_from_bytes(PAYLOAD, SETTINGS)
    b64 = base64.b64encode(PAYLOAD).decode()
    assert image_key_from_base64(b64, SETTINGS) == want
    assert image_key_from_base64("data:image/png;base64," + b64, SETTINGS) == want
    path = tmp_path / "img.png"
    path.write_bytes(PAYLOAD)
    assert image_key_from_file(path, SETTINGS) == want


def test_key_forms():
    key = image_key_from_bytes(PAYLOAD, SETTINGS)
    assert 0 <= key.value < 2**128 and len(key.hex) == 32 and int(key.hex, 16) == key.value
    assert 1_000_000 <= key.pad_value < 1_000_000 + 2**30


@pytest.mark.parametrize("bad", ["data:image/png;base64", "not base64 at all!"])
def test_bad_base64_is_a_clear_error(bad):
    with pytest.raises(ValueError):
        image_key_from_base64(bad, SETTINGS)


def test_wrong_type_is_a_clear_error():
    with pytest.raises(TypeError, match="bytes"):
        image_key_from_bytes("a string", SETTINGS)  # type: ignore[arg-type]


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_20mb_hashes_without_extra_copies(tmp_path):
    size = 20 * 1024 * 1024
    data = bytes(size)  # allocated before tracing starts
    # In memory: hashed in place, no copy of the payload at all.
    assert _peak_bytes(lambda: image_key_from_bytes(data, SETTINGS)) < size // 20
    # base64: the decode is the one copy; nothing else of payload size.
    b64 = base64.b64encode(data)
    peak = _peak_bytes(lambda: image_key_from_base64(b64, SETTINGS))
    assert size <= peak < size * 1.1, peak
    # From a file: read once (those bytes are what SGLang then decodes), nothing else of payload size.
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    peak = _peak_bytes(lambda: image_key_from_file(path, SETTINGS))
    assert size <= peak < size * 1.1, peak


# XXH3's default secret, first 96 bytes (xxhash.h, XXH3_kSecret): public, which is the problem.
_XXH3_SECRET = bytes.fromhex(
    "b8fe6c3923a44bbe7c01812cf721ad1cded46de9839097db7240a4a4b7b3671f"
    "cb79e64eccc0e578825ad07dccff7221b8084674f743248ee03590e6813a264c"
    "3c2852bb91c300cb88d0658b1b532ea3716448 97a20df94e3819ef46a9deacd8".replace(" ", ""))


def _old_key(data: bytes, settings: ProcessorSettings) -> int:
    """The key before REVIEW F1: xxh3-128 (default secret) over length-prefixed settings and the bytes."""
    h = xxhash.xxh3_128()
    prefix = settings.canonical_bytes()
    h.update(len(prefix).to_bytes(8, "little"))
    h.update(prefix)
    h.update(data)
    return h.intdigest()


def _xxh3_colliding_pair(prefix_len: int, size: int = 8192) -> tuple[bytes, bytes]:
    """Two payloads with one xxh3-128 (default secret) after a `prefix_len`-byte prefix.

    A lane whose low 32 bits of (data ^ secret) are zero multiplies to 0 and only adds its data to
    the neighbouring accumulator; two such lanes in consecutive stripes of one block add their high
    halves, so swapping high halves between them keeps every accumulator, hence the hash."""
    stripe = -(-prefix_len // 64)  # first stripe wholly inside the payload; block 0 has 16 stripes
    assert stripe + 1 < 16 and 8 * (stripe + 1) + 8 <= len(_XXH3_SECRET)
    a, b = bytearray(os.urandom(size)), None
    b = bytearray(a)
    for s, hi_a, hi_b in ((stripe, 0x1234_5678, 0x0BAD_F00D), (stripe + 1, 0x0BAD_F00D, 0x1234_5678)):
        off = 64 * s - prefix_len  # lane 0 of stripe s
        lo = struct.unpack_from("<I", _XXH3_SECRET, 8 * s)[0]  # secret word of lane 0, stripe s
        struct.pack_into("<II", a, off, lo, hi_a)
        struct.pack_into("<II", b, off, lo, hi_b)
    return bytes(a), bytes(b)


def test_a_constructed_xxh3_collision_does_not_collide_under_the_keyed_key():
    prefix_len = 8 + len(SETTINGS.canonical_bytes())
    a, b = _xxh3_colliding_pair(prefix_len)
    assert a != b
    assert _old_key(a, SETTINGS) == _old_key(b, SETTINGS), "the construction collides the old key"
    assert image_key_from_bytes(a, SETTINGS) != image_key_from_bytes(b, SETTINGS)


def test_the_namespace_separates_tenants():
    plain = image_key_from_bytes(PAYLOAD, SETTINGS)
    a = image_key_from_bytes(PAYLOAD, SETTINGS, namespace="tenant-a")
    assert a == image_key_from_bytes(PAYLOAD, SETTINGS, namespace="tenant-a")
    assert len({plain, a, image_key_from_bytes(PAYLOAD, SETTINGS, namespace="tenant-b"),
                image_key_from_bytes(PAYLOAD, SETTINGS, namespace="")}) == 4, "None and '' differ too"


@pytest.mark.parametrize("junk", ["!", "\n", " ", "é"])
def test_base64_is_as_strict_as_sglang(junk):
    import pybase64

    b64 = base64.b64encode(PAYLOAD).decode()
    bad = b64[:40] + junk + b64[40:]
    with pytest.raises(ValueError):
        pybase64.b64decode(bad, validate=True)  # what SGLang's get_image_bytes does
    with pytest.raises(ValueError, match="base64"):
        image_key_from_base64(bad, SETTINGS)
    with pytest.raises(ValueError, match="base64"):
        image_key_from_base64("data:image/png;base64," + bad, SETTINGS)
    assert decode_base64(b64) == PAYLOAD
