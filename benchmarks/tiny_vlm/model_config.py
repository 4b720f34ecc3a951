"""Sizes of the small trained Qwen2.5-VL and the directory SGLang serves it from.

The directory is written by the project's own `vlcache_sglang.model_dir` (real Qwen2 tokenizer, chat
template, processor config) with the sizes below; train.py adds the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlcache_sglang.model_dir import write_model_dir

# head_dim 64 everywhere (FlashInfer takes 64/128/256); mrope_section sums to head_dim / 2.
_ROPE = {"max_position_embeddings": 32768, "rope_theta": 1000000.0,
         "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]}}
# window_size 112 px = 4x4 merged tokens per window; the last block attends over the whole image.
SIZES: dict[str, dict[str, Any]] = {
    # Twice the width of `small`; train.py --size base (the benchmark trains `small`, see train.py).
    "base": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 1024, "max_window_layers": 4, **_ROPE,
             "vision_config": {"depth": 4, "hidden_size": 256, "num_heads": 4, "intermediate_size": 512,
                               "window_size": 112, "fullatt_block_indexes": [3]}},
    # A quarter of the compute, for CPU runs (tests, the CPU reuse check); same architecture.
    "small": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 1,
              "intermediate_size": 512, "max_window_layers": 4, **_ROPE,
              "vision_config": {"depth": 2, "hidden_size": 128, "num_heads": 2, "intermediate_size": 256,
                                "window_size": 112, "fullatt_block_indexes": [1]}},
}


def config_overrides(size: str = "base", layers: int | None = None) -> dict[str, Any]:
    """Overrides of the 3B entry (vocab 151936, tied embeddings) for `write_model_dir`."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {list(SIZES)}")
    cfg = {**SIZES[size], "vision_config": dict(SIZES[size]["vision_config"])}
    if layers is not None:
        cfg.update(num_hidden_layers=layers, max_window_layers=layers)
    return cfg


def write_tiny_model_dir(out_dir: str | Path, image_px: int, size: str = "base", layers: int | None = None,
                         tokenizer_json: str | Path | None = None) -> Path:
    """Config, processor config (no resize of image_px x image_px images), tokenizer, template."""
    # min/max pixels bracket our one image size, so neither the processor nor SGLang resizes it.
    pre = {"min_pixels": min(3136, image_px ** 2), "max_pixels": image_px ** 2}
    return write_model_dir(out_dir, "3B", config_overrides(size, layers), pre, tokenizer_json)
