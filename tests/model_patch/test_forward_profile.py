"""The profile log names each distinct active-token set once, with its runs (CPU)."""

import logging

import torch

from vlcache_sglang.layer_selector import LayerSelector
from vlcache_sglang.model_patch import forward_profile
from vlcache_sglang.model_patch.forward_profile import log_batch
from vlcache_sglang.model_patch.selective_prefill import SelectiveBatch
from vlcache_sglang.recompute_policy import ImageSpan, PolicyParams, TokenLayout, get_recompute_policy
from vlcache_sglang.reuse_planner import RequestReuse


def test_distinct_sets_are_logged_once(caplog):
    # 9 tokens, a reused 2-token image at 5..6: vlcache recomputes its first token at layers 0-1 (r=0.5)
    # and none at layer 2 (r=0): sets {0..8} minus {6}, twice, then minus {5, 6}.
    from types import SimpleNamespace

    layout = TokenLayout(seq_len=9, prefix_len=0, images=(ImageSpan(5, 2, reused=True),))
    policy = get_recompute_policy("vlcache", PolicyParams(layer_ratios=(0.5, 0.5, 0.0)))
    empty = torch.empty(0, dtype=torch.long)
    plan = RequestReuse(0, 9, layout, LayerSelector(policy, layout, 3), empty, empty, empty)
    fb = SimpleNamespace(extend_prefix_lens_cpu=[0], extend_seq_lens_cpu=[9], req_pool_indices=torch.tensor([0]),
                         out_cache_loc=torch.zeros(9, dtype=torch.long))
    sel = SelectiveBatch([plan], fb, 3)
    with caplog.at_level(logging.INFO):
        log_batch(sel, ["flashinfer", "flashinfer"], 0.5, 12.0, 10.0, 1)
    assert "2 distinct sets [8 tok/2 runs, 7 tok/2 runs]" in caplog.text
    assert "9 extend tokens" in caplog.text and "['flashinfer']" in caplog.text


def test_timing_off_runs_the_step_without_touching_the_device():
    from vlcache_sglang.model_patch.forward_profile import timed

    calls = []
    assert timed(lambda: calls.append(1) or "out", False) == ("out", 0.0)
    assert calls == [1]


def _batch(extend: bool):
    from types import SimpleNamespace
    return SimpleNamespace(mm_inputs=None, forward_mode=SimpleNamespace(is_extend=lambda: extend),
                           extend_seq_lens_cpu=[1, 40], extend_prefix_lens_cpu=[2700, 0])


def test_a_prefill_without_reuse_is_timed_and_logged_when_profiling(monkeypatch, caplog):
    from vlcache_sglang.model_patch.selective_prefill import SelectivePrefill

    syncs = []
    monkeypatch.setattr(forward_profile, "ENABLED", True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: syncs.append(1))
    prefill = SelectivePrefill(torch.ones(4))
    original = lambda model, ids, pos, fb: "logits"  # noqa: E731
    with caplog.at_level(logging.INFO):
        assert prefill.around_vl_forward(original, None, None, None, _batch(extend=True)) == "logits"
    assert "no reuse: 2 reqs, 41 extend tokens, 2700 cached, forward" in caplog.text
    assert len(syncs) == 2
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert prefill.around_vl_forward(original, None, None, None, _batch(extend=False)) == "logits"
    assert caplog.text == "" and len(syncs) == 2, "decode batches are neither timed nor logged"


def test_a_prefill_without_reuse_is_untouched_when_not_profiling(monkeypatch, caplog):
    from vlcache_sglang.model_patch.selective_prefill import SelectivePrefill

    monkeypatch.setattr(forward_profile, "ENABLED", False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: (_ for _ in ()).throw(AssertionError("synced")))
    with caplog.at_level(logging.INFO):
        out = SelectivePrefill(torch.ones(4)).around_vl_forward(lambda *a: "logits", None, None, None,
                                                               _batch(extend=True))
    assert out == "logits" and caplog.text == ""
