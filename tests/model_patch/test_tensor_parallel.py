"""The selective forward at tensor-parallel size 2, two real ranks on the CPU (gloo).

Each rank is its own process (`python test_tensor_parallel.py --rank R ...`, as SGLang runs one
scheduler per TP rank) holding its shards of the stand-in's SGLang `Qwen2Model` (column-parallel QKV
and gate/up, row-parallel o_proj and down_proj with SGLang's all-reduce, a vocab-parallel embedding)
and its one KV head of two in the pool; both ranks get the same batch. Checked on every rank:
- `full` through the vlcache decoder loop equals SGLang's own TP forward (output and the rank's K/V);
- the final hidden states are the same on both ranks;
- an observing policy (`cacheblend`) selects the same tokens on both ranks, its per-token deviations
  summed over the group by `tp_sum_ranks` (SGLang's tensor_model_parallel_all_reduce); with the sum
  replaced by identity the ranks, each seeing its own head, select differently (the check can fail);
- the default policy's probe (`image_bounded`, a sampled check, then the loop starts over with the
  decided sets) runs to the end on both ranks with the same sets and output: a rank that restarted
  alone would leave the other waiting in an all-reduce.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

HERE = Path(__file__).resolve().parent
TP = 2


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the stand-in is on the CPU: the Triton kernel needs TRITON_INTERPRET=1 there")
def test_two_tp_ranks_compute_full_as_stock_and_select_alike(tmp_path):
    init_file = tmp_path / "dist-init"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    procs = [subprocess.Popen([sys.executable, str(Path(__file__)), "--rank", str(r), "--init-file", str(init_file),
                               "--out", str(tmp_path)], env=env, cwd=HERE, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(TP)]
    try:  # a rank left waiting in an all-reduce would hang: bounded, and both stopped on the way out
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-4000:]}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(TP)]
    for r, got in enumerate(ranks):
        assert got["full_vs_stock"] <= 1e-5, f"rank {r}: full differs from SGLang's TP forward"
        assert got["pool_vs_stock"] <= 1e-5, f"rank {r}: full's K/V differ from SGLang's"
    assert ranks[0]["output"] == ranks[1]["output"], "the ranks' final hidden states differ"
    assert ranks[0]["blend_sets"] == ranks[1]["blend_sets"], "cacheblend selected differently on the two ranks"
    assert ranks[0]["blend_sets_unsummed"] != ranks[1]["blend_sets_unsummed"], \
        "without the sum over ranks each rank ranks by its own head: the control must diverge"
    assert ranks[0]["probe"] == ranks[1]["probe"], "the probe decided differently on the two ranks"
    assert ranks[0]["probe"]["replanned"], "the probe started the loop over"


# ---- one rank (a process of its own) ---------------------------------------------------------------

def _rank_main(rank: int, init_file: str, out_dir: Path) -> None:
    import torch
    from standin import StandIn
    from test_layer_equivalence import FRESH, PREFIXED, policy_sets, run_plans, stock_reference, vlcache_forward

    from vlcache_sglang.layer_selector import LayerSelector
    from vlcache_sglang.model_patch import selective_attention
    from vlcache_sglang.model_patch.selective_prefill import SelectivePrefill, tp_sum_ranks
    from vlcache_sglang.recompute_policy import PolicyParams, get_recompute_policy

    selective_attention.choose_backend = lambda *args: "triton"  # FlashInfer needs a GPU
    standin = StandIn(num_layers=2, tp_size=TP, tp_rank=rank, init_file=init_file)
    layers = standin.num_layers
    batch = standin.make_batch([PREFIXED, FRESH])
    cached = standin.snapshot_kv()  # the image slots' "cached" K/V: this rank's own noise

    want, want_pool = stock_reference(standin, batch)
    got, _ = vlcache_forward(standin, batch, [policy_sets(PREFIXED, "full", layers), None])
    pool_diff = max((g - w).abs().max().item() for g, w in zip(standin.snapshot_kv(), want_pool))

    def observed(policy, summed: bool = True):
        standin.restore_kv(cached)
        plans = [SimpleNamespace(selector=LayerSelector(policy, PREFIXED.token_layout(), layers), report=None), None]
        prefill = SelectivePrefill(standin.inv_freq)  # resolves tp_sum_ranks() as a scheduler does
        if not summed:
            prefill._sum_ranks = lambda t: t
        out, prefill = run_plans(standin, batch, plans, prefill)
        return out, prefill.test_selectors[0]

    def blend_sets(summed: bool) -> list[list[int]]:
        policy = get_recompute_policy("cacheblend", PolicyParams(recompute_ratio=0.25, check_layer=1))
        return [s.tolist() for s in observed(policy, summed)[1].sets]

    def probe() -> dict:
        params = PolicyParams(recompute_ratio=0.05, check_layer=1, error_bound=0.1, check_sample=0.25)
        out, selector = observed(get_recompute_policy("image_bounded", params))
        return {"sets": [s.tolist() for s in selector.sets], "replanned": selector.replanned,
                "output": out.flatten().tolist()}

    assert tp_sum_ranks()(torch.ones(1)).item() == TP, "the sum goes over both ranks"
    result = {"full_vs_stock": (got - want).abs().max().item(), "pool_vs_stock": pool_diff,
              "output": got.flatten().tolist(), "blend_sets": blend_sets(summed=True),
              "blend_sets_unsummed": blend_sets(summed=False), "probe": probe()}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--init-file", required=True)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    _rank_main(a.rank, a.init_file, a.out)
