import base64
import tracemalloc

import pytest

from vlcache_sglang.image_key import (
    ProcessorSettings,
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
    # From a file: streamed in 1 MiB pieces.
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    assert _peak_bytes(lambda: image_key_from_file(path, SETTINGS)) < 2 * 1024 * 1024
