"""KeptLengthTable: a trimmed request's decode tables read exactly its kept K/V plus decode tokens."""

from __future__ import annotations

import pytest
import torch

from vlcache_sglang.compression.decode_tables import KeptLengthTable
from vlcache_sglang.compression.selection import apply_compaction, plan_compaction


def test_trimmed_and_untrimmed_requests_in_one_batch(device):
    # Drawn on the CPU (the same numbers everywhere), run where the Triton kernel runs (conftest).
    gen = torch.Generator().manual_seed(1)
    layers, m, p, decoded = 2, 12, 3, 4
    k = [torch.randn(64, 1, 4, generator=gen).to(device) for _ in range(layers)]
    v = [torch.randn(64, 1, 4, generator=gen).to(device) for _ in range(layers)]
    req_to_token = torch.randperm(64, generator=gen)[:40].reshape(2, 20).to(device, torch.int32)
    row = req_to_token[1, :m].long()
    kept = [torch.tensor([0, 1, 2, 5, 9, 11]), torch.tensor([0, 1, 2, 11])]
    k0 = [t.clone() for t in k]
    plan = plan_compaction(row, kept, p)
    apply_compaction(k, v, plan)
    table = KeptLengthTable(2, layers, device)
    table.set(1, plan)
    seq = torch.tensor([7, m + decoded], device=device)
    indptr, indices = table.tables(req_to_token, torch.tensor([0, 1], device=device), seq)
    for layer in range(layers):
        t1 = indices[layer, indptr[layer, 1]: indptr[layer, 2]].long()
        want = torch.cat([row[kept[layer].to(device)], req_to_token[1, m: m + decoded].long()])
        # Same K as the uncompressed request's kept tokens, then its decode tokens.
        assert torch.equal(k[layer][t1], k0[layer][want])
        t0 = indices[layer, indptr[layer, 0]: indptr[layer, 1]]
        assert torch.equal(t0, req_to_token[0, :7])
    table.clear(1)
    indptr, _ = table.tables(req_to_token, torch.tensor([1], device=device), seq[1:])
    assert indptr[:, 1].tolist() == [m + decoded] * layers


def test_plans_that_drop_the_prefix_are_refused():
    plan = plan_compaction(torch.arange(6), [torch.tensor([1, 4])], shared_prefix_len=2)
    with pytest.raises(NotImplementedError, match="prefix"):
        KeptLengthTable(1, 1, "cpu").set(0, plan)
    whole = plan_compaction(torch.arange(6), [torch.tensor([0, 1, 4])], shared_prefix_len=2)
    with pytest.raises(ValueError, match="layers"):
        KeptLengthTable(1, 2, "cpu").set(0, whole)
