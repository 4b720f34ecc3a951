"""Fixtures of the tests that run the selective forward on the CPU stand-in model (standin.py)."""

from __future__ import annotations

import pytest

from standin import build_standin, restore_server_args


@pytest.fixture(scope="module")
def standin():
    """A 2-layer SGLang Qwen2Model with real pools (one per test module; server args restored after)."""
    yield build_standin(num_layers=2)
    restore_server_args()


@pytest.fixture
def triton_attention(monkeypatch):
    """SelectiveAttention's backend choice on CPU tensors: the Triton kernel (records the would-be choice)."""
    from vlcache_sglang.model_patch import selective_attention

    real = selective_attention.choose_backend
    chosen = []
    monkeypatch.setattr(selective_attention, "choose_backend",
                        lambda *args: chosen.append(real(*args)) or "triton")
    return chosen
