"""The tokenizer-side shortcut against SGLang's real QwenVLImageProcessor (CPU)."""

import asyncio
import base64
import errno
import inspect
import io
import pickle
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor

from vlcache_sglang.processor_patch import ImageProcessingShortcut


def _data_url(w, h, seed):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def proc(sglang_server_args, qwen_model_dir):
    import sglang.srt.multimodal.processors.base_processor as base
    from sglang.srt.multimodal.processors.qwen_vl import QwenVLImageProcessor

    hf_config = AutoConfig.from_pretrained(qwen_model_dir)
    with pytest.MonkeyPatch.context() as mp:
        if not torch.cuda.is_available():  # SGLang's fast image processor targets the GPU unless on CPU
            mp.setattr(base, "_is_cpu", True)
        yield QwenVLImageProcessor(hf_config, sglang_server_args, AutoProcessor.from_pretrained(qwen_model_dir), None)


def _original():
    from sglang.srt.multimodal.processors.qwen_vl import QwenVLImageProcessor

    return inspect.unwrap(QwenVLImageProcessor.process_mm_data_async)


def _prompt(proc, n_images, before="Some text before"):
    img = "<|vision_start|><|image_pad|><|vision_end|>"
    return f"<|im_start|>system\n{before}<|im_end|>\n<|im_start|>user\n" + \
        "".join(f"Picture {i}: {img}" for i in range(n_images)) + "What?<|im_end|>\n<|im_start|>assistant\n"


def _run(shortcut, proc, images, text):
    req = SimpleNamespace(video_data=None, audio_data=None, rid="t")
    return asyncio.run(shortcut.around_process(_original(), proc, images, text, req))


def test_cache_hit_output_equals_sglang_processing(proc):
    shortcut = ImageProcessingShortcut(1 << 30)
    images = [_data_url(640, 480, 1), _data_url(333, 217, 2)]
    stock = asyncio.run(_original()(proc, images, _prompt(proc, 2), SimpleNamespace(video_data=None, audio_data=None, rid="s")))
    miss = _run(shortcut, proc, images, _prompt(proc, 2))
    assert shortcut.cache.misses == 2 and len(shortcut.cache) == 2
    hit = _run(shortcut, proc, images, _prompt(proc, 2))
    assert shortcut.cache.hits == 2 and shortcut.served_from_cache == 1, "the hit path itself is compared"
    for out in (miss, hit):
        assert out.input_ids == list(stock.input_ids)
        assert torch.equal(out.mrope_positions, stock.mrope_positions)
        assert torch.equal(torch.as_tensor(out.mrope_position_delta), torch.as_tensor(stock.mrope_position_delta))
        assert len(out.mm_items) == len(stock.mm_items) == 2
        for ours, theirs in zip(out.mm_items, stock.mm_items):
            assert ours.offsets == theirs.offsets
            assert torch.equal(ours.feature, theirs.feature)
            assert torch.equal(torch.as_tensor(ours.image_grid_thw).reshape(-1),
                               torch.as_tensor(theirs.image_grid_thw).reshape(-1))
        assert miss.mm_items[0].hash == hit.mm_items[0].hash != miss.mm_items[1].hash
        assert out.padded_input_ids[out.mm_items[0].offsets[0][0]] == out.mm_items[0].pad_value


def test_same_image_after_other_text_keeps_its_key(proc):
    shortcut = ImageProcessingShortcut(1 << 30)
    img = _data_url(500, 300, 3)
    a = _run(shortcut, proc, [img], _prompt(proc, 1, "short"))
    b = _run(shortcut, proc, [img], _prompt(proc, 1, "a much longer system prompt " * 5))
    assert a.mm_items[0].hash == b.mm_items[0].hash and shortcut.served_from_cache == 1
    assert b.mm_items[0].offsets[0][0] > a.mm_items[0].offsets[0][0]


@pytest.mark.parametrize("bad", ["data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n garbage").decode(),
                                 "data:image/png;base64,!!!notbase64"])
def test_corrupt_image_is_a_value_error(proc, bad):
    with pytest.raises(ValueError):
        _run(ImageProcessingShortcut(1 << 30), proc, [bad], _prompt(proc, 1))


def test_processed_cache_is_bounded():
    from vlcache_sglang.processed_image_cache import ProcessedImage, ProcessedImageCache

    cache = ProcessedImageCache(max_bytes=3 * 400)
    for key in range(4):
        assert cache.put(key, ProcessedImage(torch.zeros(100, dtype=torch.float32), (1, 10, 10)))
    assert len(cache) == 3 and cache.get(0) is None and cache.get(3) is not None and cache.nbytes == 1200
    assert not cache.put(9, ProcessedImage(torch.zeros(1000), (1, 10, 10))), "larger than the whole cache"


def test_pixels_cached_in_the_vision_dtype_are_the_same_numbers_the_tower_sees(proc):
    shortcut = ImageProcessingShortcut(1 << 30, pixel_dtype=torch.bfloat16)
    img = [_data_url(320, 240, 4)]
    miss = _run(shortcut, proc, img, _prompt(proc, 1))
    hit = _run(shortcut, proc, img, _prompt(proc, 1))
    assert shortcut.served_from_cache == 1 and hit.mm_items[0].feature.dtype == torch.bfloat16
    # Qwen2.5-VL's get_image_feature casts pixel values to the tower's dtype before anything else.
    assert torch.equal(hit.mm_items[0].feature, miss.mm_items[0].feature.to(torch.bfloat16))


def test_processor_settings_read_the_real_processor(proc):
    from vlcache_sglang.processor_patch import processor_settings

    settings = processor_settings(proc)
    assert (settings.min_pixels, settings.max_pixels) == (3136, 12845056)
    assert settings.model_id == str(proc.server_args.model_path)
    assert dict(settings.extra)["merge_size"] == "2"


def _run_as(shortcut, proc, images, text, original=None, **req_fields):
    req = SimpleNamespace(video_data=None, audio_data=None, rid="t", **req_fields)
    return asyncio.run(shortcut.around_process(original or _original(), proc, images, text, req))


def test_the_salt_namespaces_the_processed_cache_and_the_keys(proc):
    from vlcache_sglang.image_key import KEY_ATTR

    shortcut = ImageProcessingShortcut(1 << 30)
    img = [_data_url(200, 150, 5)]
    a = _run_as(shortcut, proc, img, _prompt(proc, 1), extra_key="tenant-a")
    again = _run_as(shortcut, proc, img, _prompt(proc, 1), extra_key="tenant-a")
    assert shortcut.served_from_cache == 1, "same salt: a hit"
    b = _run_as(shortcut, proc, img, _prompt(proc, 1), extra_key="tenant-b")
    assert shortcut.served_from_cache == 1, "another salt: no hit (a hit would be a timing oracle)"
    assert a.mm_items[0].hash == again.mm_items[0].hash != b.mm_items[0].hash
    for out in (a, again, b):
        item = out.mm_items[0]
        assert getattr(item, KEY_ATTR) == item.hash
        assert getattr(pickle.loads(pickle.dumps(item)), KEY_ATTR) == item.hash, "reaches the scheduler"


def test_client_supplied_mm_hashes_leave_the_request_unkeyed(proc):
    from vlcache_sglang.image_key import KEY_ATTR

    shortcut = ImageProcessingShortcut(1 << 30)
    out = _run_as(shortcut, proc, [_data_url(100, 100, 6)], _prompt(proc, 1), mm_hashes=["ab" * 16])
    assert not hasattr(out.mm_items[0], KEY_ATTR) and len(shortcut.cache) == 0


def test_junk_base64_is_refused_whether_or_not_the_image_is_cached(proc):
    shortcut = ImageProcessingShortcut(1 << 30)
    good = _data_url(120, 90, 7)
    head, payload = good.split(",", 1)
    bad = f"{head},{payload[:50]}!{payload[50:]}"
    with pytest.raises(ValueError):
        _run(shortcut, proc, [bad], _prompt(proc, 1))  # not cached: SGLang's strict decode
    _run(shortcut, proc, [good], _prompt(proc, 1))
    with pytest.raises(ValueError, match="base64"):
        _run(shortcut, proc, [bad], _prompt(proc, 1))  # cached: the same answer, not a hit
    assert shortcut.served_from_cache == 0


def test_a_decompression_bomb_is_a_client_error(proc, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 160x120 > 2 x 1000: DecompressionBombError
    with pytest.raises(ValueError, match="could not be decoded"):
        _run(ImageProcessingShortcut(1 << 30), proc, [_data_url(160, 120, 8)], _prompt(proc, 1))


@pytest.mark.parametrize("err, client", [(OSError("broken data stream"), True),
                                         (OSError(errno.ENOENT, "No such file"), True),
                                         (OSError(errno.EMFILE, "Too many open files"), False),
                                         (OSError(errno.ENOSPC, "No space left"), False)])
def test_only_bad_images_are_client_errors(proc, err, client):
    async def failing(*args, **kwargs):
        try:
            raise err
        except OSError as e:
            raise RuntimeError(f"Error while loading data: {e}") from e

    with pytest.raises(ValueError if client else RuntimeError):
        _run_as(ImageProcessingShortcut(1 << 30), proc, [_data_url(64, 64, 9)], _prompt(proc, 1), original=failing)


def test_key_of_never_touches_the_file_system():
    from vlcache_sglang.processor_patch import key_of
    from vlcache_sglang.image_key import ProcessorSettings

    settings = ProcessorSettings("m", 1, 2)
    start = time.monotonic()
    assert key_of("/proc/kmsg", settings) is None
    assert key_of("file:///proc/kmsg", settings) is None
    assert time.monotonic() - start < 1.0


def test_a_local_file_is_read_once_off_the_event_loop_and_sglang_decodes_those_bytes(proc, tmp_path, monkeypatch):
    import vlcache_sglang.processor_patch as pp

    path = tmp_path / "img.png"
    path.write_bytes(base64.b64decode(_data_url(90, 60, 10).split(",", 1)[1]))
    threads, seen = [], []
    real_read = pp.read_local_image

    def spy(p, *a):
        threads.append(threading.get_ident())
        return real_read(p, *a)

    async def original(proc_, image_data, input_text, request_obj, *args, **kwargs):
        seen.append(image_data)
        return await _original()(proc_, image_data, input_text, request_obj, *args, **kwargs)

    monkeypatch.setattr(pp, "read_local_image", spy)
    shortcut = ImageProcessingShortcut(1 << 30)
    out = _run_as(shortcut, proc, [str(path)], _prompt(proc, 1), original=original)
    assert threads and threading.get_ident() not in threads, "read in a worker thread"
    assert seen[0] == [path.read_bytes()], "SGLang decodes the bytes that were keyed"
    assert len(shortcut.cache) == 1 and out.mm_items[0].hash == pp.image_key_from_bytes(
        path.read_bytes(), shortcut._settings).value


def test_proc_kmsg_is_a_client_error_and_relative_paths_are_base64_as_in_sglang(proc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rel.png").write_bytes(b"\x89PNG not read")
    calls = []

    async def original(proc_, image_data, input_text, request_obj, *args, **kwargs):
        calls.append(list(image_data))
        return SimpleNamespace(mm_items=[])

    shortcut = ImageProcessingShortcut(1 << 30)
    start = time.monotonic()
    for path in ("/proc/kmsg", "file:///proc/kmsg"):
        with pytest.raises(ValueError, match="local image"):  # stock SGLang would hang a loader thread
            _run_as(shortcut, proc, [path], _prompt(proc, 1), original=original)
    assert time.monotonic() - start < 5 and not calls
    with pytest.raises(ValueError, match="base64"):
        _run_as(shortcut, proc, ["rel.png"], _prompt(proc, 1), original=original)  # as SGLang: base64
    # Unkeyed requests too: an http image first, client mm_hashes, a video alongside.
    for images, fields in ((["https://example.com/a.png", "/proc/kmsg"], {}),
                           (["/proc/kmsg"], {"mm_hashes": ["ab" * 16]})):
        with pytest.raises(ValueError, match="local image"):
            _run_as(shortcut, proc, images, _prompt(proc, len(images)), original=original, **fields)
    with pytest.raises(ValueError, match="local image"):
        req = SimpleNamespace(video_data=["v.mp4"], audio_data=None, rid="t")
        asyncio.run(shortcut.around_process(original, proc, ["/proc/kmsg"], _prompt(proc, 1), req))
    assert not calls


def test_an_image_data_path_keeps_its_other_fields(proc, tmp_path):
    from sglang.srt.utils.common import ImageData

    path = tmp_path / "img.png"
    path.write_bytes(base64.b64decode(_data_url(80, 60, 11).split(",", 1)[1]))
    seen = []

    async def original(proc_, image_data, input_text, request_obj, *args, **kwargs):
        seen.append(image_data)
        return await _original()(proc_, image_data, input_text, request_obj, *args, **kwargs)

    entry = ImageData(url=f"file://{path}", detail="high")
    out = _run_as(ImageProcessingShortcut(1 << 30), proc, [entry], _prompt(proc, 1), original=original)
    sent = seen[0][0]
    assert sent.url == path.read_bytes() and sent.detail == "high" and entry.url == f"file://{path}"
    assert len(out.mm_items) == 1


@pytest.mark.skipif(not __import__("os").path.isdir("/dev/shm"), reason="needs /dev/shm")
def test_shared_pixels_of_a_cache_hit_reach_the_scheduler_and_survive_eviction(proc):
    from sglang.srt.managers.mm_utils import _unwrap_tensor_or_list

    from vlcache_sglang.shared_pixels import SharedPixels

    shortcut = ImageProcessingShortcut(1 << 30, pixel_dtype=torch.bfloat16, share_pixels=True)
    img = [_data_url(160, 120, 12)]
    miss = _run(shortcut, proc, img, _prompt(proc, 1))
    hit = _run(shortcut, proc, img, _prompt(proc, 1))
    feature = hit.mm_items[0].feature
    assert isinstance(feature, SharedPixels) and shortcut.served_from_cache == 1
    in_flight = pickle.dumps(feature)
    shortcut.cache.max_bytes = shortcut.cache.nbytes  # the next (smaller) image evicts this one
    _run(shortcut, proc, [_data_url(64, 64, 13)], _prompt(proc, 1))
    assert hit.mm_items[0].hash not in shortcut.cache and len(shortcut.cache) == 1
    assert not __import__("os").path.exists(f"/dev/shm/{feature.shm_name}"), "unlinked at eviction, no timer"
    mapped = _unwrap_tensor_or_list(pickle.loads(in_flight))
    assert torch.equal(mapped, miss.mm_items[0].feature.to(torch.bfloat16)), "the request sent before eviction"


# ----- the soak's hostile catalogue (benchmarks/soak.py), each kind through the real hook ---------
# SGLang's OpenAI chat serving answers a ValueError from request processing with 400 and its text
# (serving_chat._handle_non_streaming_request, serving_base.handle_request); anything else is a 500.
# So the verdict here is the status the soak expects on the GPU, and the message it must match.

def _soak():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import soak

    return soak


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    soak = _soak()
    big = soak.make_large_file(tmp_path_factory.mktemp("soak") / "large.png")
    twin = _data_url(64, 48, 21)
    return twin, {h.name: h for h in soak.hostile_catalogue(twin, big)}


_IMAGE_KINDS = ["corrupt_png", "truncated_png", "truncated_jpeg", "corrupt_jpeg_soi_eoi", "empty_payload",
                "text_as_image", "empty_url", "data_url_without_comma", "relative_path", "junk_base64",
                "non_ascii_base64", "bomb_20000x20000", "aspect_28x8000", "bad_second_image", "url_refused",
                "url_unresolvable",
                "proc_kmsg_abs", "proc_kmsg_file_url", "large_file_abs", "large_file_file_url", "missing_file"]


def test_the_catalogue_is_covered_here():
    soak = _soak()
    names = {h.name for h in soak.hostile_catalogue("data:image/png;base64,AAAA", "/tmp/x")}
    assert names == set(_IMAGE_KINDS) | {"bad_override_policy", "bad_override_ratio"}


@pytest.mark.parametrize("name", _IMAGE_KINDS)
def test_each_hostile_image_is_a_400_with_a_clear_message_and_the_hook_keeps_serving(proc, catalogue, name):
    import re

    twin, by_name = catalogue
    h = by_name[name]
    assert h.expect == (400,)
    shortcut = ImageProcessingShortcut(1 << 30)
    images = [twin] * h.extra_images + [h.image]
    start = time.monotonic()
    with pytest.raises(ValueError) as info:
        _run(shortcut, proc, images, _prompt(proc, len(images)))
    message = str(info.value)
    assert re.search(h.message, message, re.IGNORECASE | re.DOTALL), message
    assert len(message) < 1000, "the message names the problem, it does not echo the payload"
    assert time.monotonic() - start < 10, "no request may hold the tokenizer (a 200 MB file, /proc/kmsg)"
    if name in _soak().TWIN_KINDS:  # the same answer once the valid image is cached
        _run(shortcut, proc, [twin], _prompt(proc, 1))
        with pytest.raises(ValueError, match=h.message):
            _run(shortcut, proc, images, _prompt(proc, len(images)))
        assert shortcut.served_from_cache == 0
    # The same shortcut serves the next good request (nothing half-cached by the bad one).
    ok = _run(shortcut, proc, [twin], _prompt(proc, 1))
    assert len(ok.mm_items) == 1


@pytest.mark.parametrize("name", ["bad_override_policy", "bad_override_ratio"])
def test_the_soaks_bad_overrides_are_400s_with_the_fix(catalogue, name):
    from vlcache_sglang.request_policy import validate_override

    h = catalogue[1][name]
    with pytest.raises(ValueError, match=h.message):
        validate_override(None, SimpleNamespace(custom_params={"vlcache": h.override}), 151000)


def test_the_soaks_odd_but_valid_images_are_processed_and_then_served_from_the_cache(proc):
    """28 x 5000 (aspect 179, under SGLang's 200), 56 x 56, an 8000 x 8000 PNG under PIL's bomb limit:
    the soak expects a 200 for each (compared with stock), so the processor must take them."""
    shortcut = ImageProcessingShortcut(1 << 30)
    for name, url in _soak().odd_valid_images():
        first = _run(shortcut, proc, [url], _prompt(proc, 1))
        again = _run(shortcut, proc, [url], _prompt(proc, 1, "other text"))
        assert len(first.mm_items) == 1 and first.mm_items[0].hash == again.mm_items[0].hash, name
    assert shortcut.served_from_cache == 3
