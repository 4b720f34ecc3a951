"""The patched Qwen2.5-VL prefill: copy reused image KV in, then compute only the active tokens.

Two AROUND hooks, active only for batches that carry a vlcache plan (else stock code runs):

* `Qwen2_5_VLForConditionalGeneration.forward`: takes the requests' RequestReuse plans off their
  MultimodalInputs (SGLang clears `forward_batch.mm_inputs` during embedding), copies every reused
  image's KV into the request's slots with K rotated by δ (one copy-rotate launch for the batch),
  and wraps the requests' LayerSelectors in one SelectiveBatch;
* `Qwen2Model.forward`: the decoder loop over active tokens only. At layer l it gathers the hidden
  states of S_l (S_l ⊆ S_{l-1}), runs QKV/RoPE for them, writes their K/V into their own slots,
  attends over each request's whole KV (SelectiveAttention), and runs the MLP for them alone.
  Where a request's policy observes at l, QKV/RoPE run for S_{l-1} first, the policy sees those
  fresh K/V beside the cached ones in the slots and picks S_l, and only then are S_l's K/V written
  (the reused tokens it left out keep the cached K/V). A probing policy's observation replans its
  request from layer 0 (the policy's `replan`, recorded by its LayerSelector): the loop then starts
  over with the sets decided, rewriting what the probe's pass wrote for them.
  The final hidden states are scattered back to the extend layout; the last prompt token of every
  request is always active, so the logits processor reads what it always reads. When every layer's
  S_l is known before the forward and S_0 is small, the loop runs as one CUDA graph replay
  (selective_graph.py; a shrinking plan as S_0 with per-layer write slots, a stepped one as a graph
  per captured layer segment).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol, Sequence

import torch

from vlcache_sglang.kernels import copy_rotate_pool_kv
from vlcache_sglang.model_patch import forward_profile, rotation_check
from vlcache_sglang.model_patch.selective_attention import RunLayout, SelectiveAttention, runs_of
from vlcache_sglang.model_patch.selective_graph import SegmentInput, SelectiveGraphs
from vlcache_sglang.model_patch.selective_layers import layer_attend, layer_qkv, selective_layer
from vlcache_sglang.recompute_policy import LayerObservation
from vlcache_sglang.reuse_planner import PLANS_ATTR, RequestReuse

SELECTIVE_ATTR = "vlcache_selective"  # on ForwardBatch while the model runs


class QueryObserver(Protocol):
    """Sees Q (after RoPE) of the active tokens at every layer, where the stock forward would hand it
    to RadixAttention (which this loop bypasses). Set by the composition root: compression's capture
    of the post-vision queries (`compression/runtime.py`); this module knows nothing more of it."""

    def wants_queries(self, forward_batch: Any) -> bool:
        """Whether this batch's Q is wanted (then the loop runs eagerly: a graph replay shows no layer)."""

    def observe_active_queries(self, attn: Any, active_rows_cpu: torch.Tensor, q: torch.Tensor,
                               forward_batch: Any) -> None:
        """q: [len(active_rows_cpu), qo_heads * head_dim] of layer `attn.layer_id`; active_rows_cpu:
        sorted int64 indices of those tokens on the batch's extend axis."""


class SelectiveBatch:
    """Per-layer active tokens of a whole batch (indices into the extend token axis), built as the
    decoder loop reaches each layer from the requests' LayerSelectors. Requests without a plan
    compute every token. A layer whose sets are all unchanged shares the previous layer's rows and
    runs (no per-layer rebuild)."""

    def __init__(self, plans: list[Optional[RequestReuse]], forward_batch: Any, num_layers: int,
                 sum_ranks: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> None:
        """sum_ranks: per-token sums over the tensor-parallel ranks, for observations (`tp_sum_ranks`)."""
        self._selectors = [p.selector if p is not None else None for p in plans]
        self._sum_ranks = sum_ranks
        self._prefix = [int(n) for n in forward_batch.extend_prefix_lens_cpu]
        extend = [int(n) for n in forward_batch.extend_seq_lens_cpu]
        self._req_rows = forward_batch.req_pool_indices.tolist()
        self._device = forward_batch.out_cache_loc.device
        self._offsets = [0]
        for n in extend:
            self._offsets.append(self._offsets[-1] + n)
        self._every_token = [torch.arange(self._prefix[i], self._prefix[i] + extend[i]) if s is None else None
                             for i, s in enumerate(self._selectors)]
        self.num_layers = num_layers
        self.num_extend_tokens = self._offsets[-1]
        self._rows: list[Optional[torch.Tensor]] = [None] * num_layers  # device int64, sorted
        self._rows_cpu: list[Optional[torch.Tensor]] = [None] * num_layers
        self._runs: list[Optional[RunLayout]] = [None] * num_layers
        self._changed: list[bool] = [True] * num_layers

    @property
    def single_set(self) -> bool:
        """Every layer computes the same tokens, known now (`none`, `first_k`, uniform `vlcache`)."""
        return all(s is None or s.layer_invariant for s in self._selectors)

    @property
    def static_plan(self) -> bool:
        """Every layer's set is known before the forward (no policy observes): one CUDA graph can
        run them all, S_0 at every layer with `layer_out_loc`."""
        return all(s is None or s.ready(self.num_layers - 1) for s in self._selectors)

    def layer_out_loc(self, out_loc: torch.Tensor) -> torch.Tensor:
        """[L, |S_0|]: where layer l writes each S_0 token's K/V (out_loc: S_0's slots) — its own slot
        if the token is in S_l, else slot 0, so a dropped reused token keeps its cached K/V."""
        if self.single_set:
            return out_loc.expand(self.num_layers, -1)
        rows0, masks = self.rows_cpu(0), []
        for layer in range(self.num_layers):  # an unchanged layer shares the previous one's mask
            masks.append(torch.isin(rows0, self.rows_cpu(layer)) if self.changed(layer) else masks[-1])
        in_set = torch.stack(masks)
        return torch.where(in_set.to(out_loc.device), out_loc, torch.zeros_like(out_loc))

    def charge_first_set(self) -> None:
        """Each plan's cost as the graph path paid it: S_0 at every layer (LayerSelector.charge_first_set)."""
        for s in self._selectors:
            if s is not None:
                s.charge_first_set()

    @property
    def probing(self) -> bool:
        """Some request's policy probes: this pass ends at its check layer and the loop starts over."""
        return any(s is not None and s.probing for s in self._selectors)

    def start_over(self) -> None:
        """After a probe replanned its request: every layer's rows are built again from the sets."""
        n = self.num_layers
        self._rows, self._rows_cpu, self._runs, self._changed = [None] * n, [None] * n, [None] * n, [True] * n

    def settled_after(self, layer: int) -> bool:
        """Every layer is decided and no set changes after `layer`: the rest of the loop could run as
        one graph of layers [layer, last]."""
        return self.ready(self.num_layers - 1) and not any(self.changed(j) for j in range(layer + 1, self.num_layers))

    def ready(self, layer: int) -> bool:
        """Every request's S_layer is known (else some policy observes at this layer)."""
        return all(s is None or s.ready(layer) for s in self._selectors)

    def layer(self, layer: int) -> tuple[torch.Tensor, RunLayout]:
        """(rows, runs) of S_layer (the previous layer's objects when unchanged)."""
        if self._rows[layer] is None:
            self._build(layer)
        return self._rows[layer], self._runs[layer]

    def changed(self, layer: int) -> bool:
        """S_layer differs from S_{layer-1} in some request (always True at layer 0)."""
        self.layer(layer)
        return self._changed[layer]

    def observe(self, layer: int, rows_cpu: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                out_loc: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
        """Hand each observing request the fresh (k, v: [rows, d], rows = S_{layer-1}) and cached
        (the pool's, at their slots) K/V of its reused tokens of S_{layer-1}; they decide S_layer.
        True when a probe replanned its request (the loop must start over: `start_over`)."""
        replanned = False
        for i, sel in enumerate(self._selectors):
            if sel is None or sel.ready(layer):
                continue
            tokens = sel.candidates(layer)
            idx = torch.searchsorted(rows_cpu, self._offsets[i] + tokens - self._prefix[i]).to(self._device)
            slots = out_loc[idx]
            sel.observe(layer, LayerObservation(
                tokens=tokens,
                k_fresh=k[idx], k_cached=k_cache[slots].reshape(len(tokens), -1),
                v_fresh=v[idx], v_cached=v_cache[slots].reshape(len(tokens), -1),
                sum_ranks=self._sum_ranks,
            ))
            replanned = replanned or sel.replanned
        return replanned

    def rows_cpu(self, layer: int) -> torch.Tensor:
        self.layer(layer)
        return self._rows_cpu[layer]

    def report(self, plans: list[Optional[RequestReuse]]) -> None:
        """Each plan's outcome to its scheduler (every layer is decided once the loop has run)."""
        for plan in plans:
            if plan is not None and plan.report is not None and plan.selector.ready(self.num_layers - 1):
                plan.report(plan.selector.outcome())

    def _build(self, layer: int) -> None:
        if not self.ready(layer):
            raise RuntimeError(f"layer {layer} awaits an observation; its rows are not known yet")
        changed = layer == 0 or any(s is not None and s.changed[layer] for s in self._selectors)
        self._changed[layer] = changed
        if not changed:
            self.layer(layer - 1)
            self._rows[layer], self._rows_cpu[layer] = self._rows[layer - 1], self._rows_cpu[layer - 1]
            self._runs[layer] = self._runs[layer - 1]
            return
        abs_sets = [s.sets[layer] if s is not None else self._every_token[i] for i, s in enumerate(self._selectors)]
        rows = torch.cat([self._offsets[i] + (t - self._prefix[i]) for i, t in enumerate(abs_sets)])
        self._rows_cpu[layer] = rows
        self._rows[layer] = rows.to(self._device)
        self._runs[layer] = runs_of(abs_sets, self._req_rows)


def tp_sum_ranks() -> Callable[[torch.Tensor], torch.Tensor]:
    """A sum over the tensor-parallel group (identity on one GPU or without distributed state): an
    observing policy's per-token norms must cover every rank's KV heads, so that all ranks select the
    same tokens. NCCL and SGLang's custom all-reduce give every rank the same sum."""
    try:
        from sglang.srt.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce

        if get_tensor_model_parallel_world_size() > 1:
            return lambda t: tensor_model_parallel_all_reduce(t.contiguous())
    except (ImportError, AssertionError):  # no TP group: CPU tests, tools outside a server
        pass
    return lambda t: t


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


class SelectivePrefill:
    """Holds what the hooks need across calls: the model's rotary frequencies and the attention."""

    def __init__(self, inv_freq: torch.Tensor) -> None:
        self.inv_freq = inv_freq
        self._attention: Optional[SelectiveAttention] = None
        self._backends: list[str] = []  # chosen per plan in the current batch (for the profile log)
        self._decoder_ms = 0.0  # the decoder loop's share of the forward (for the profile log)
        self._graphs = SelectiveGraphs()  # captured at the first batch that can use them
        self._sum_ranks = tp_sum_ranks()  # resolved once, in the scheduler process, after TP is set up
        self.query_observer: Optional[QueryObserver] = None

    def capture_graphs(self, lm: Any, dtype: torch.dtype, req_to_token: torch.Tensor, pool: Any,
                       segments: Sequence[tuple[int, int]] = (), tails: Sequence[int] = ()) -> None:
        """The decoder loop's CUDA graphs, at server start-up (else the first reuse request would pay
        for the capture: 5.5 s on a cold H200); `segments`: the layer ranges of the server's stepped
        plan (`selective_graph.layer_segments`), captured too; `tails`: first layers of the ranges
        [lo, last] that run after a plain (not probing) check layer (`selective_graph.tail_starts`)."""
        self._graphs.segments = tuple(segments)
        self._graphs.tails = tuple(tails)
        self._graphs.capture(lm, dtype, lm.config.hidden_size, torch.int64, req_to_token, pool)

    def _run_segments(self, lm: Any, sel: SelectiveBatch, full: torch.Tensor, positions: torch.Tensor,
                      forward_batch: Any, req_to_token: torch.Tensor, pool: Any) -> Optional[torch.Tensor]:
        """The batch through the per-segment graphs when its sets change only where captured segments
        start (None otherwise, or when a segment has no graph for its size)."""
        segments = self._graphs.segments
        starts = {lo for lo, _ in segments}
        if not segments or any(sel.changed(layer) and layer not in starts for layer in range(sel.num_layers)):
            return None
        inputs: list[SegmentInput] = []
        first = prev = None
        for lo, hi in segments:
            rows, runs = sel.layer(lo)
            if rows.numel() == 0:
                return None  # the eager loop's early exit handles it
            keep = None if prev is None else torch.searchsorted(prev, rows)
            inputs.append(SegmentInput(lo, hi, keep, positions[:, rows].contiguous(),
                                       forward_batch.out_cache_loc[rows], runs))
            first = rows if first is None else first
            prev = rows
        return self._graphs.run_segments(lm, full[first], inputs, req_to_token, pool)

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
        sel = SelectiveBatch(plans, forward_batch, num_layers, self._sum_ranks)
        setattr(forward_batch, SELECTIVE_ATTR, sel)
        self._backends = []
        try:
            out, forward_ms = forward_profile.timed(forward, profile)
        finally:
            setattr(forward_batch, SELECTIVE_ATTR, None)
        sel.report(plans)
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
        rows, runs = sel.layer(0)  # layer 0 is never observed (a check layer is >= 1)
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
        observer = self.query_observer  # not in a probe's pass: the loop starts over after it
        if observer is not None and (sel.probing or not observer.wants_queries(forward_batch)):
            observer = None
        # A replay shows no layer's Q to the observer. A stepped plan: a graph per segment; else the
        # per-layer write slots of S_0, for a set that fits.
        if sel.static_plan and observer is None and not sel.single_set:
            graphed = self._run_segments(lm, sel, full, positions, forward_batch, req_to_token, pool)
            if graphed is not None:
                self._backends.append("triton-graph-segments")
                out[sel.layer(sel.num_layers - 1)[0]] = graphed
                return out
        if sel.static_plan and observer is None and self._graphs.fits(rows.numel()):
            graphed = self._graphs.run(lm, hidden, row_positions, sel.layer_out_loc(row_out_loc), runs,
                                       req_to_token, pool)
            if graphed is not None:
                self._backends.append("triton-graph")
                if sel.single_set:
                    out[rows] = graphed
                else:  # as the eager loop: only the last layer's set leaves the loop
                    last = sel.layer(sel.num_layers - 1)[0]
                    out[last] = graphed[torch.searchsorted(rows, last)]
                    sel.charge_first_set()
                return out
        planned = False
        for layer_id in range(lm.start_layer, lm.end_layer):
            layer = lm.layers[layer_id]
            observed = None
            if not sel.ready(layer_id):
                # The policy looks at this layer's fresh K/V of S_{l-1} before anything is written.
                observed = layer_qkv(layer, row_positions, hidden, residual)
                k_cache, v_cache = pool.get_kv_buffer(layer.self_attn.attn.layer_id)
                if sel.observe(layer_id, sel.rows_cpu(layer_id - 1), observed[1], observed[2], row_out_loc, k_cache,
                               v_cache):
                    # A probe decided its request's sets from layer 0 on: run the batch again with them
                    # (its embeddings as they are; every token it computes rewrites its K/V).
                    sel.start_over()
                    return self._selective_forward(lm, input_ids, positions, forward_batch, full, sel)
            new_rows, runs = sel.layer(layer_id)
            if layer_id > lm.start_layer and sel.changed(layer_id):  # S_l shrank: keep its rows among S_{l-1}'s
                if new_rows.numel() == 0:
                    return out  # as above: only a chunk whose output is never read can get here
                keep = torch.searchsorted(rows, new_rows)
                if observed is not None:
                    observed = tuple(t[keep] for t in observed)
                else:
                    hidden, residual = hidden[keep], residual[keep]
                rows = new_rows
                row_positions = positions[:, rows].contiguous()
                row_out_loc = forward_batch.out_cache_loc[rows]
            if (observed is None and observer is None and layer_id in self._graphs.tails
                    and sel.settled_after(layer_id)):
                # After a check layer the sets are fixed: the remaining layers as one replay.
                tail = SegmentInput(layer_id, lm.end_layer, None, row_positions, row_out_loc, runs)
                graphed = self._graphs.run_segments(lm, hidden, [tail], req_to_token, pool, residual)
                if graphed is not None:
                    self._backends.append("triton-graph-tail")
                    out[rows] = graphed
                    return out
            if sel.changed(layer_id) or not planned:
                self._plan(runs, req_to_token, layer.self_attn, hidden.dtype, pool)
                planned = True
            if observed is None and observer is None:
                hidden, residual = selective_layer(layer, row_positions, hidden, residual, row_out_loc, pool,
                                                   self._attention)
                continue
            if observed is None:  # selective_layer split at its seam, so the observer sees q
                observed = layer_qkv(layer, row_positions, hidden, residual)
            if observer is not None:
                observer.observe_active_queries(layer.self_attn.attn, sel.rows_cpu(layer_id), observed[0],
                                                forward_batch)
            hidden, residual = layer_attend(layer, *observed, row_out_loc, pool, self._attention)
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
