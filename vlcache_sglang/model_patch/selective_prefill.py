"""The patched Qwen2.5-VL prefill: copy reused image KV in, then compute only the active tokens.

Two AROUND hooks, active only for batches that carry a vlcache plan (else stock code runs):

* `Qwen2_5_VLForConditionalGeneration.forward`: takes the requests' RequestReuse plans off their
  MultimodalInputs (SGLang clears `forward_batch.mm_inputs` during embedding), copies every reused
  image's KV into the request's slots with K rotated by δ (one copy-rotate launch for the batch),
  and builds the batch's per-layer active-token index sets;
* `Qwen2Model.forward`: the decoder loop over active tokens only. At layer l it gathers the hidden
  states of S_l (S_l ⊆ S_{l-1}), runs QKV/RoPE for them, writes their K/V into their own slots,
  attends over each request's whole KV (SelectiveAttention), and runs the MLP for them alone.
  The final hidden states are scattered back to the extend layout; the last prompt token of every
  request is always active, so the logits processor reads what it always reads. When every layer
  has the same S_l and it is small, the loop runs as one CUDA graph replay (selective_graph.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch

from vlcache_sglang.kernels import copy_rotate_pool_kv
from vlcache_sglang.model_patch import forward_profile, rotation_check
from vlcache_sglang.model_patch.selective_attention import RunLayout, SelectiveAttention, runs_of
from vlcache_sglang.model_patch.selective_graph import SelectiveGraphs
from vlcache_sglang.model_patch.selective_layers import selective_layer
from vlcache_sglang.reuse_planner import PLANS_ATTR, RequestReuse

SELECTIVE_ATTR = "vlcache_selective"  # on ForwardBatch while the model runs


@dataclasses.dataclass
class SelectiveBatch:
    """Per-layer active tokens of a whole batch (indices into the extend token axis)."""

    layer_rows: list[torch.Tensor]  # [L] device int64, sorted, S_l ⊆ S_{l-1}
    layer_runs: list[RunLayout]  # [L] the runs of S_l (same object when S_l == S_{l-1})
    num_extend_tokens: int

    @property
    def single_set(self) -> bool:
        """Every layer computes the same tokens (`none`, `first_k`): one CUDA graph can run them all."""
        return all(rows is self.layer_rows[0] for rows in self.layer_rows)


def _take_plans(forward_batch: Any) -> Optional[list[Optional[RequestReuse]]]:
    mm_inputs = getattr(forward_batch, "mm_inputs", None)
    if not mm_inputs or not forward_batch.forward_mode.is_extend():
        return None
    plans: list[Optional[RequestReuse]] = []
    for i, mm in enumerate(mm_inputs):
        table = getattr(mm, PLANS_ATTR, None) if mm is not None else None
        plans.append(table.pop(forward_batch.extend_prefix_lens_cpu[i], None) if table else None)
    return plans if any(p is not None for p in plans) else None


def copy_reused_kv(pool: Any, plans: list[Optional[RequestReuse]], inv_freq: torch.Tensor) -> None:
    """Every reused image of the batch into its request's slots, K rotated by δ: one launch."""
    used = [p for p in plans if p is not None]
    copy_rotate_pool_kv(pool, torch.cat([p.src_slots for p in used]), torch.cat([p.dst_slots for p in used]),
                        torch.cat([p.delta for p in used]), inv_freq)


def build_selective_batch(plans: list[Optional[RequestReuse]], forward_batch: Any, num_layers: int) -> SelectiveBatch:
    """Batch-level S_l from the per-request plans; requests without a plan compute every token.

    A layer whose sets are the previous layer's objects (`RecomputePolicy.select` returns S_{l-1}
    itself when nothing changes) shares that layer's rows and runs: no per-layer comparisons."""
    prefix = forward_batch.extend_prefix_lens_cpu
    extend = forward_batch.extend_seq_lens_cpu
    req_rows = forward_batch.req_pool_indices.tolist()
    offsets = [0]
    for n in extend:
        offsets.append(offsets[-1] + int(n))
    every_token = [torch.arange(int(prefix[i]), int(prefix[i]) + int(extend[i])) if p is None else None
                   for i, p in enumerate(plans)]
    layer_rows, layer_runs = [], []
    prev_abs: Optional[list[torch.Tensor]] = None
    for layer in range(num_layers):
        abs_sets = [p.layer_sets[layer] if p is not None else every_token[i] for i, p in enumerate(plans)]
        if prev_abs is not None and all(a is b for a, b in zip(abs_sets, prev_abs)):
            layer_rows.append(layer_rows[-1])
            layer_runs.append(layer_runs[-1])
            continue
        rows = torch.cat([offsets[i] + (s - int(prefix[i])) for i, s in enumerate(abs_sets)])
        layer_rows.append(rows.to(forward_batch.out_cache_loc.device))
        layer_runs.append(runs_of(abs_sets, req_rows))
        prev_abs = abs_sets
    return SelectiveBatch(layer_rows, layer_runs, offsets[-1])


class SelectivePrefill:
    """Holds what the hooks need across calls: the model's rotary frequencies and the attention."""

    def __init__(self, inv_freq: torch.Tensor) -> None:
        self.inv_freq = inv_freq
        self._attention: Optional[SelectiveAttention] = None
        self._backends: list[str] = []  # chosen per plan in the current batch (for the profile log)
        self._decoder_ms = 0.0  # the decoder loop's share of the forward (for the profile log)
        self._graphs = SelectiveGraphs()  # captured at the first batch that can use them

    def around_vl_forward(self, original: Callable[..., Any], model: Any, input_ids: Any, positions: Any,
                          forward_batch: Any, *args: Any, **kwargs: Any) -> Any:
        forward = lambda: original(model, input_ids, positions, forward_batch, *args, **kwargs)  # noqa: E731
        plans = _take_plans(forward_batch)
        if plans is None:
            if not (forward_profile.enabled() and forward_batch.forward_mode.is_extend()):
                return forward()
            # The stock path's prefills (new images, prefix hits) timed the same way: the floor that
            # a reuse batch's forward is compared with.
            out, forward_ms = forward_profile.timed(forward, True)
            forward_profile.log_stock_batch(forward_batch, forward_ms)
            return out
        from sglang.srt.model_executor.forward_context import get_token_to_kv_pool

        pool = get_token_to_kv_pool()
        profile = forward_profile.enabled()
        copy_ms = forward_profile.timed(lambda: copy_reused_kv(pool, plans, self.inv_freq), profile)[1]
        check = rotation_check.RotationCheck(pool, plans) if rotation_check.enabled() else None
        num_layers = len(model.model.layers)
        sel = build_selective_batch(plans, forward_batch, num_layers)
        setattr(forward_batch, SELECTIVE_ATTR, sel)
        self._backends = []
        try:
            out, forward_ms = forward_profile.timed(forward, profile)
        finally:
            setattr(forward_batch, SELECTIVE_ATTR, None)
        if check is not None:
            check.compare()
        if profile:
            forward_profile.log_batch(sel, self._backends, copy_ms, forward_ms, self._decoder_ms, len(plans))
        return out

    def around_lm_forward(self, original: Callable[..., Any], lm: Any, input_ids: Any, positions: Any,
                          forward_batch: Any, input_embeds: Any = None, pp_proxy_tensors: Any = None,
                          **kwargs: Any) -> Any:
        sel: Optional[SelectiveBatch] = getattr(forward_batch, SELECTIVE_ATTR, None)
        if sel is None:
            return original(lm, input_ids, positions, forward_batch, input_embeds, pp_proxy_tensors, **kwargs)
        run = lambda: self._selective_forward(lm, input_ids, positions, forward_batch, input_embeds, sel)  # noqa: E731
        out, self._decoder_ms = forward_profile.timed(run, forward_profile.enabled())
        return out

    def _selective_forward(self, lm: Any, input_ids: Any, positions: torch.Tensor, forward_batch: Any,
                           input_embeds: Optional[torch.Tensor], sel: SelectiveBatch) -> torch.Tensor:
        from sglang.srt.model_executor.forward_context import get_req_to_token_pool, get_token_to_kv_pool

        pool = get_token_to_kv_pool()
        req_to_token = get_req_to_token_pool().req_to_token
        full = input_embeds if input_embeds is not None else lm.embed_tokens(input_ids)
        out = torch.zeros(sel.num_extend_tokens, full.shape[-1], dtype=full.dtype, device=full.device)
        rows = sel.layer_rows[0]
        if rows.numel() == 0:
            # A prefill chunk that lies inside a reused image (e.g. a 4K image's 10K tokens across
            # 8K chunks) under `none`: nothing to compute, and zero-token kernel launches are invalid.
            # S_l only shrinks and the last prompt token is always active, so this is never a chunk
            # whose output is read.
            return out
        # Gathered once per distinct token set, not per layer: tiny active sets are launch-bound.
        row_positions = positions[:, rows].contiguous()
        row_out_loc = forward_batch.out_cache_loc[rows]
        hidden, residual = full[rows], None
        if sel.single_set:
            graphed = self._graphs.run(lm, hidden, row_positions, row_out_loc, sel.layer_runs[0], req_to_token,
                                       pool)
            if graphed is not None:
                self._backends.append("triton-graph")
                out[rows] = graphed
                return out
        planned_runs: Optional[RunLayout] = None
        for layer_id in range(lm.start_layer, lm.end_layer):
            layer = lm.layers[layer_id]
            new_rows = sel.layer_rows[layer_id]
            if new_rows is not rows:  # S_l shrank: keep the rows of S_l among those of S_{l-1}
                if new_rows.numel() == 0:
                    return out  # as above: only a chunk whose output is never read can get here
                keep = torch.searchsorted(rows, new_rows)
                hidden, residual = hidden[keep], residual[keep]
                rows = new_rows
                row_positions = positions[:, rows].contiguous()
                row_out_loc = forward_batch.out_cache_loc[rows]
            runs = sel.layer_runs[layer_id]
            if runs is not planned_runs:
                self._plan(runs, req_to_token, layer.self_attn, hidden.dtype, pool)
                planned_runs = runs
            hidden, residual = selective_layer(layer, row_positions, hidden, residual, row_out_loc, pool,
                                               self._attention)
        hidden, _ = lm.norm(hidden, residual)
        out[rows] = hidden
        return out

    def _plan(self, runs: RunLayout, req_to_token: torch.Tensor, attn: Any, dtype: torch.dtype, pool: Any) -> None:
        if self._attention is None:
            self._attention = SelectiveAttention(req_to_token.device)
        radix = attn.attn
        self._attention.plan(runs, req_to_token, radix.tp_q_head_num, radix.tp_k_head_num, radix.head_dim,
                             radix.scaling, dtype, pool.k_buffer[0].dtype)
        self._backends.append(self._attention.backend)
