"""The profile log names each distinct active-token set once, with its runs (CPU)."""

import logging

import torch

from vlcache_sglang.model_patch.forward_profile import log_batch
from vlcache_sglang.model_patch.selective_attention import runs_of
from vlcache_sglang.model_patch.selective_prefill import SelectiveBatch


def test_distinct_sets_are_logged_once(caplog):
    a, b = torch.tensor([0, 1, 5]), torch.tensor([0, 1])
    runs_a, runs_b = runs_of([a], [0]), runs_of([b], [0])
    sel = SelectiveBatch([a, a, b], [runs_a, runs_a, runs_b], num_extend_tokens=9)
    with caplog.at_level(logging.INFO):
        log_batch(sel, ["flashinfer", "flashinfer"], 0.5, 12.0, 10.0, 1)
    assert "2 distinct sets [3 tok/2 runs, 2 tok/1 runs]" in caplog.text
    assert "9 extend tokens" in caplog.text and "['flashinfer']" in caplog.text


def test_timing_off_runs_the_step_without_touching_the_device():
    from vlcache_sglang.model_patch.forward_profile import timed

    calls = []
    assert timed(lambda: calls.append(1) or "out", False) == ("out", 0.0)
    assert calls == [1]
