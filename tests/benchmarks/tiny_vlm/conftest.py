"""Fixtures for the tiny trained-model benchmark: a small model directory and a random-weight model."""

import os
from pathlib import Path

import pytest

from benchmarks.tiny_vlm.grid_task import GridSpec

SPEC = GridSpec(cells=4, colours=("red", "green", "blue"), max_count=3)  # 112 px, 16 image tokens


@pytest.fixture(scope="session")
def spec() -> GridSpec:
    return SPEC


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A 'small' model directory for 112-px grids, written by model_config (real tokenizer)."""
    from benchmarks.tiny_vlm.model_config import write_tiny_model_dir

    tok = None
    if os.environ.get("VLCACHE_TEST_MODEL_DIR"):  # hosts without dashscope: reuse its tokenizer
        tok = Path(os.environ["VLCACHE_TEST_MODEL_DIR"]) / "tokenizer.json"
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "tiny-qwen2.5-vl", SPEC.image_px,
                                "small", layers=2, tokenizer_json=tok)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    """Random weights (seeded), eval mode, fp32, CPU."""
    import torch
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(AutoConfig.from_pretrained(tiny_dir)).float().eval()
