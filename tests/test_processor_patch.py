"""The tokenizer-side shortcut against SGLang's real QwenVLImageProcessor (CPU)."""

import asyncio
import base64
import inspect
import io
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
