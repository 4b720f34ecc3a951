"""Per-layer decode tables over kept tokens: equal to the torch reference, fixed buffers respected."""

from __future__ import annotations

import pytest
import torch

from vlcache_sglang.kernels.kept_kv_indices import kept_kv_indices, kept_kv_lens
from vlcache_sglang.kernels.kept_kv_indices_reference import kept_kv_indices_reference

ROWS, WIDTH, LAYERS = 6, 1200, 3


def _batch(device):
    """Rows 1 and 4 trimmed (prompt 1000 and 37 tokens), rows 0 and 5 untrimmed, row 2/3 idle."""
    gen = torch.Generator().manual_seed(0)
    req_to_token = torch.randint(1, 50_000, (ROWS, WIDTH), generator=gen, dtype=torch.int32)
    kept = torch.zeros(ROWS, LAYERS, dtype=torch.int32)
    prompt = torch.zeros(ROWS, dtype=torch.int32)
    kept[1], prompt[1] = torch.tensor([100, 613, 1]), 1000  # 613 > one 512-slot block
    kept[4], prompt[4] = torch.tensor([37, 5, 0]), 37  # layer 0 keeps all; layer 2 none (decode only)
    rows = torch.tensor([4, 0, 1, 5])
    seq = torch.tensor([37, 9, 1017, 1])  # row 4 before its first decode token; row 5 a one-token request
    return [t.to(device) for t in (req_to_token, rows, seq, kept, prompt)]


def test_tables_match_reference(device):
    req_to_token, rows, seq, kept, prompt = _batch(device)
    indptr, indices = kept_kv_indices(req_to_token, rows, seq, kept, prompt)
    want = kept_kv_indices_reference(req_to_token.cpu(), rows.cpu(), seq.cpu(), kept.cpu(), prompt.cpu())
    lens = kept_kv_lens(rows, seq, kept, prompt).cpu()
    assert lens.tolist() == [[37, 9, 117, 1], [5, 9, 630, 1], [0, 9, 18, 1]]
    for layer in range(LAYERS):
        assert indptr[layer].tolist() == [0] + torch.cumsum(lens[layer], 0).tolist()
        for b in range(4):
            got = indices[layer, indptr[layer, b]: indptr[layer, b + 1]].cpu()
            assert torch.equal(got, want[layer][b]), (layer, b)
    # An untrimmed request reads exactly SGLang's table, row[0 : seq_len].
    assert torch.equal(indices[0, 37:46].cpu(), req_to_token[0, :9].cpu())


def test_fixed_buffers_are_filled_in_place_and_not_past_the_end(device):
    req_to_token, rows, seq, kept, prompt = _batch(device)
    indptr_buf = torch.full((LAYERS, 9), -5, dtype=torch.int32, device=device)
    indices_buf = torch.full((LAYERS, 2000), -7, dtype=torch.int32, device=device)
    indptr, indices = kept_kv_indices(req_to_token, rows, seq, kept, prompt, indptr_buf, indices_buf)
    assert indices is indices_buf and indptr.data_ptr() == indptr_buf.data_ptr()
    totals = indptr[:, -1].tolist()
    for layer, total in enumerate(totals):
        assert bool((indices_buf[layer, :total] >= 1).all())  # every slot written from req_to_token
        assert bool((indices_buf[layer, total:] == -7).all())  # nothing past the batch's total
    assert bool((indptr_buf[:, 5:] == -5).all())


def test_empty_batch_and_capacity_check(device):
    req_to_token, _, _, kept, prompt = _batch(device)
    empty = torch.empty(0, dtype=torch.int64, device=device)
    indptr, _ = kept_kv_indices(req_to_token, empty, empty, kept, prompt)
    assert indptr.tolist() == [[0]] * LAYERS
    if device == "cpu":
        _, rows, seq, _, _ = _batch(device)
        with pytest.raises(ValueError, match="needs"):
            kept_kv_indices(req_to_token, rows, seq, kept, prompt,
                            kv_indices=torch.empty(LAYERS, 100, dtype=torch.int32))


def test_contract(device):
    req_to_token, rows, seq, kept, prompt = _batch(device)
    with pytest.raises(ValueError, match="int32"):
        kept_kv_indices(req_to_token, rows, seq, kept.long(), prompt)
    with pytest.raises(ValueError, match="kv_indptr"):
        kept_kv_indices(req_to_token, rows, seq, kept, prompt,
                        kv_indptr=torch.empty(LAYERS, 3, dtype=torch.int32, device=device))
