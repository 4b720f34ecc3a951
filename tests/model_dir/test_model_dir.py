"""The offline model directory: real Qwen2 tokenizer ids, a processor that tokenizes real images."""

import io
import json

import pytest
from PIL import Image
from transformers import AutoConfig, AutoProcessor, AutoTokenizer

from vlcache_sglang.model_dir import MODEL_SIZES, write_model_dir


def test_tokenizer_ids_match_qwen2(qwen_model_dir):
    tok = AutoTokenizer.from_pretrained(qwen_model_dir)
    assert tok.encode("<|im_start|>user\nHello world<|im_end|>") == [151644, 872, 198, 9707, 1879, 151645]
    assert len(tok) == 151665
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert tok.convert_tokens_to_ids("<|vision_start|>") == 151652
    text = "Grüße, 世界! 12345\n\n  tabs\tand spaces"
    assert tok.decode(tok.encode(text)) == text


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 90)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("width, height", [(640, 480), (1920, 1080), (333, 217)])
def test_processor_turns_a_png_into_grid_and_pad_tokens(qwen_model_dir, width, height):
    proc = AutoProcessor.from_pretrained(qwen_model_dir)
    image = Image.open(io.BytesIO(_png(width, height)))
    messages = [{"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image"},
                                             {"type": "text", "text": "What colour is it?"}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<|vision_start|><|image_pad|><|vision_end|>" in text
    out = proc(text=[text], images=[image], return_tensors="pt")
    t, h, w = out["image_grid_thw"][0].tolist()
    assert t == 1 and h % 2 == 0 and w % 2 == 0
    # Qwen2.5-VL: 14-px patches merged 2x2, resized to multiples of 28 near the original size.
    assert abs(h * 14 - height) <= 28 and abs(w * 14 - width) <= 28
    assert int((out["input_ids"] == 151655).sum()) == t * h * w // 4


@pytest.mark.parametrize("size", list(MODEL_SIZES))
def test_config_loads_with_transformers(tmp_path, size):
    d = write_model_dir(tmp_path / f"Qwen2.5-VL-{size}-Instruct", size)
    cfg = AutoConfig.from_pretrained(d)
    assert cfg.architectures == ["Qwen2_5_VLForConditionalGeneration"]
    text = cfg.text_config
    assert text.hidden_size == MODEL_SIZES[size]["hidden_size"]
    assert text.num_hidden_layers == MODEL_SIZES[size]["num_hidden_layers"]
    assert cfg.vision_config.out_hidden_size == MODEL_SIZES[size]["hidden_size"]
    tok_cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == json.loads((d / "chat_template.json").read_text())["chat_template"]


def test_unknown_size_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="7B"):
        write_model_dir(tmp_path / "x", "13B")


def test_overrides_give_a_custom_size_and_processor(tmp_path, qwen_model_dir):
    overrides = {"hidden_size": 256, "num_hidden_layers": 2, "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
                 "vision_config": {"depth": 2, "hidden_size": 128, "fullatt_block_indexes": [1]}}
    d = write_model_dir(tmp_path / "custom", "3B", overrides, {"max_pixels": 112 * 112},
                        tokenizer_json=qwen_model_dir / "tokenizer.json")
    cfg = AutoConfig.from_pretrained(d)
    assert cfg.text_config.hidden_size == 256 and cfg.text_config.num_hidden_layers == 2
    assert cfg.text_config.num_attention_heads == MODEL_SIZES["3B"]["num_attention_heads"]  # not overridden
    assert cfg.vision_config.depth == 2 and cfg.vision_config.out_hidden_size == 256
    assert cfg.vision_config.patch_size == 14  # the rest of the vision config stays
    assert json.loads((d / "preprocessor_config.json").read_text())["max_pixels"] == 112 * 112
    assert (d / "tokenizer.json").read_bytes() == (qwen_model_dir / "tokenizer.json").read_bytes()
    # Without overrides the released sizes are unchanged.
    assert json.loads((qwen_model_dir / "config.json").read_text())["hidden_size"] == MODEL_SIZES["7B"]["hidden_size"]
