"""Write a Qwen2.5-VL-{7B,3B}-Instruct directory that SGLang serves with `--load-format dummy`."""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

from vlcache_sglang.model_dir.qwen2_tokenizer import SPECIAL_TOKENS, NUM_REGULAR_TOKENS, build_qwen2_tokenizer

_VISION = {
    "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
    "num_heads": 16, "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2,
    "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2, "temporal_patch_size": 2, "model_type": "qwen2_5_vl",
}

# The language-model sizes of the released checkpoints; everything else is shared.
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "7B": {"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
           "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
           "tie_word_embeddings": False, "max_window_layers": 28},
    "3B": {"hidden_size": 2048, "num_hidden_layers": 36, "num_attention_heads": 16,
           "num_key_value_heads": 2, "intermediate_size": 11008, "vocab_size": 151936,
           "tie_word_embeddings": True, "max_window_layers": 70},
}

_PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}


def model_config(size: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json of a released size; `overrides` replaces top-level keys, and its "vision_config"
    entry is merged into the vision config (out_hidden_size follows the final hidden_size unless given)."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {list(MODEL_SIZES)}")
    overrides = dict(overrides or {})
    vision_overrides = overrides.pop("vision_config", {})
    lm = {**MODEL_SIZES[size], **overrides}
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0, "hidden_act": "silu", "initializer_range": 0.02,
        "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "sliding_window": 32768, "use_sliding_window": False, "use_cache": True,
        "torch_dtype": "bfloat16", "transformers_version": "4.41.2",
        "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
        "video_token_id": 151656,
        **lm,
        "vision_config": {**_VISION, "out_hidden_size": lm["hidden_size"], **vision_overrides},
    }


def chat_template() -> str:
    return (resources.files("vlcache_sglang.model_dir") / "templates" / "chat_template.jinja").read_text()


def _tokenizer_config(template: str) -> dict[str, Any]:
    added = {
        str(NUM_REGULAR_TOKENS + i): {"content": t, "lstrip": False, "normalized": False,
                                      "rstrip": False, "single_word": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    return {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:14]),
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "errors": "replace", "model_max_length": 131072, "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None, "clean_up_tokenization_spaces": False,
        "chat_template": template,  # bench_serving's openai dataset reads it from here
    }


def write_model_dir(out_dir: str | Path, size: str = "7B", config_overrides: dict[str, Any] | None = None,
                    preprocessor_overrides: dict[str, Any] | None = None,
                    tokenizer_json: str | Path | None = None) -> Path:
    """Write config, processor config, chat template and the real Qwen2 tokenizer to out_dir.

    config_overrides: see `model_config` (custom sizes, e.g. a small trained model).
    preprocessor_overrides: replaces keys of preprocessor_config.json (e.g. min/max pixels).
    tokenizer_json: copy this tokenizer.json instead of building it (hosts without `dashscope`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    template = chat_template()

    def dump(name: str, obj: Any) -> None:
        (out / name).write_text(json.dumps(obj, indent=2) + "\n")

    dump("config.json", model_config(size, config_overrides))
    dump("generation_config.json", {"bos_token_id": 151643, "eos_token_id": [151645, 151643],
                                    "pad_token_id": 151643, "do_sample": False})
    dump("preprocessor_config.json", {**_PREPROCESSOR, **(preprocessor_overrides or {})})
    dump("chat_template.json", {"chat_template": template})
    dump("tokenizer_config.json", _tokenizer_config(template))
    if tokenizer_json is not None:
        shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    else:
        build_qwen2_tokenizer().save(str(out / "tokenizer.json"))
    return out
