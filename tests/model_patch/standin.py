"""A small real SGLang Qwen2.5-VL language model on the CPU, with real pools and a real ForwardBatch.

`build_standin()` returns a `StandIn`: SGLang's own `Qwen2Model` (from `sglang.srt.models.qwen2`,
the model Qwen2.5-VL's `self.model` is) built from a `Qwen2_5_VLTextConfig` with M-RoPE, fp32 and
random weights; SGLang's `MHATokenToKVPool` and `ReqToTokenPool`; SGLang's `torch_native` attention
backend published through SGLang's forward context (where the vlcache forward reads the pools too).

    standin = build_standin(num_layers=2)
    batch = standin.make_batch([RequestSpec(30, prefix_len=8, images=((12, 4, 4),)), RequestSpec(18)])
    want = standin.stock_forward(batch)  # SGLang's Qwen2Model.forward, all tokens, every layer

A request's cached prefix is put in the pool by a stock prefill of those tokens, as an earlier
prefill (or a radix prefix hit) would have left it. `stock_forward(batch, layer_sets)` is the
reference for a shrinking active set: still SGLang's `Qwen2DecoderLayer.forward` and torch_native
attention, but at layer l only the tokens of S_l write their K/V (the others keep what the pool
holds, as after a reuse copy), and only the rows of the last S_l are meaningful.

What the runtime needs, set up once per process (`ensure_cpu_runtime`): SGLang's server args
(a dummy-boundary ServerArgs through `RuntimeContext.override_server_args`, SGLang's test kit:
device cpu, attention backend torch_native) and its distributed state over gloo: world size 1, or
one rank of a tensor-parallel group (`StandIn(tp_size=2, tp_rank=r)` in each of two processes:
that rank's shards and KV heads; test_tensor_parallel.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
from types import SimpleNamespace
from typing import Optional, Sequence
from unittest import mock

import torch

HIDDEN, QO_HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE, VOCAB = 64, 4, 2, 16, 128, 256
MROPE_SECTION = [2, 3, 3]  # Qwen2.5-VL's [16, 24, 24] scaled to head_dim 16 (sums to head_dim / 2)
ROPE_THETA = 1_000_000.0


_runtime: Optional[SimpleNamespace] = None


def ensure_cpu_runtime(tp_size: int = 1, tp_rank: int = 0, init_file: Optional[str] = None) -> SimpleNamespace:
    """SGLang's server args and distributed state on the CPU (idempotent, per process): world size 1,
    or one rank of a `tp_size` tensor-parallel group over gloo (each rank its own process, all with the
    same `init_file`).

    The server args stay published for the rest of the process (SGLang's layers read them at
    forward time); `restore_server_args()` puts back what was published before, for a fixture's
    teardown.
    """
    global _runtime
    if _runtime is not None:
        return _runtime
    from sglang.srt.distributed import parallel_state as ps
    from sglang.srt.runtime_context import get_context

    override = get_context().override_server_args(device="cpu", attention_backend="torch_native")
    server_args = override.install()
    if not torch.distributed.is_initialized():
        init_file = init_file or tempfile.NamedTemporaryFile(prefix="standin-dist-", delete=False).name
        ps.init_distributed_environment(world_size=tp_size, rank=tp_rank, local_rank=tp_rank,
                                        distributed_init_method=f"file://{init_file}", backend="gloo")
    if not ps.model_parallel_is_initialized():
        with mock.patch.object(ps, "init_model_parallel_group", _cpu_group(ps.init_model_parallel_group)):
            ps.initialize_model_parallel(tensor_model_parallel_size=tp_size)
    _runtime = SimpleNamespace(server_args=server_args, override=override)
    return _runtime


def _cpu_group(make_group):
    """SGLang's group factory without its GPU communicators (pynccl, custom / mscclpp / symmetric-memory
    all-reduce): a CPU tensor's all-reduce then goes to torch.distributed over gloo."""
    def make(*args, **kwargs):
        return make_group(*args, **{**kwargs, "use_pynccl": False, "use_custom_allreduce": False,
                                    "use_mscclpp_allreduce": False, "use_torch_symm_mem_allreduce": False})
    return make


def restore_server_args() -> None:
    global _runtime
    if _runtime is not None:
        _runtime.override.restore()
        _runtime = None


def text_config(num_layers: int = 2):
    """Qwen2.5-VL's text config, tiny. Qwen2_5_VLTextConfig turns {"type": "mrope"} into
    rope_type "default" with mrope_section, which is what makes SGLang's get_rope build
    MRotaryEmbedding for the real model."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig

    return Qwen2_5_VLTextConfig(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=num_layers,
        num_attention_heads=QO_HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, vocab_size=VOCAB,
        max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=ROPE_THETA,
        rope_scaling={"type": "mrope", "mrope_section": list(MROPE_SECTION)},
        bos_token_id=None, eos_token_id=None,
    )


def _randomize(lm: torch.nn.Module, seed: int, shard_seed: Optional[int] = None) -> None:
    """Random weights of a scale that keeps activations O(1) (SGLang allocates them empty).
    shard_seed: a tensor-parallel rank's own draws for the parameters it holds a shard of; the norms,
    which every rank holds whole, keep `seed`'s (None: one generator for all, the one-GPU model)."""
    gen = torch.Generator().manual_seed(seed)
    shard = gen if shard_seed is None else torch.Generator().manual_seed(shard_seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=shard))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=shard))
            else:  # [out, in]
                p.copy_(torch.randn(p.shape, generator=shard) / math.sqrt(p.shape[-1]))


@dataclasses.dataclass(frozen=True)
class RequestSpec:
    """One request of a batch: `seq_len` tokens, the first `prefix_len` already in the pool.

    images: (start, grid_h, grid_w) per image (merged grid: grid_h * grid_w tokens from `start`),
    for Qwen2-VL's M-RoPE positions (t, h, w) and for recompute policies' token layouts.
    """

    seq_len: int
    prefix_len: int = 0
    images: tuple[tuple[int, int, int], ...] = ()

    @property
    def extend_len(self) -> int:
        return self.seq_len - self.prefix_len

    def image_spans(self) -> list[tuple[int, int]]:
        return [(start, h * w) for start, h, w in self.images]

    def token_layout(self, reused: bool = True):
        """vlcache's TokenLayout of this request, every image reused (what recompute policies plan on)."""
        from vlcache_sglang.recompute_policy import ImageSpan, TokenLayout

        return TokenLayout(self.seq_len, self.prefix_len,
                           tuple(ImageSpan(start, n, reused=reused) for start, n in self.image_spans()))


def mrope_positions(spec: RequestSpec) -> torch.Tensor:
    """[3, seq_len] positions as Qwen2-VL's get_rope_index gives one image per grid (t = 1):
    text advances all three axes together; an image's tokens share t and spread over h and w;
    text after an image starts one past the largest position used."""
    pos = torch.empty(3, spec.seq_len, dtype=torch.int64)
    nxt, i = 0, 0
    for start, h, w in sorted(spec.images) + [(spec.seq_len, 0, 0)]:
        n = start - i
        pos[:, i:start] = nxt + torch.arange(n)
        nxt += n
        if h * w:
            rows = torch.arange(h).repeat_interleave(w)
            cols = torch.arange(w).repeat(h)
            pos[0, start:start + h * w] = nxt
            pos[1, start:start + h * w] = nxt + rows
            pos[2, start:start + h * w] = nxt + cols
            nxt += max(h, w)
        i = start + h * w
    return pos


@dataclasses.dataclass
class Batch:
    """An extend batch: what SGLang's forward and the vlcache forward both take."""

    requests: list[RequestSpec]
    req_rows: list[int]  # req_to_token row of each request
    slots: list[torch.Tensor]  # [seq_len] KV slot of every token of each request
    input_ids: torch.Tensor  # [n] the extend tokens, request after request
    positions: torch.Tensor  # [3, n] their M-RoPE positions
    forward_batch: object  # SGLang's ForwardBatch (EXTEND)
    offsets: list[int]  # extend-axis start of each request (and the total at the end)
    token_ids: list[torch.Tensor]  # [seq_len] every token of each request, prefix included

    @property
    def num_tokens(self) -> int:
        return self.offsets[-1]

    def rows_of(self, per_request_abs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Extend-axis rows of absolute token indices given per request."""
        return torch.cat([self.offsets[i] + (torch.as_tensor(a) - r.prefix_len)
                          for i, (r, a) in enumerate(zip(self.requests, per_request_abs))])

    def slots_of(self, per_request_abs: Sequence[torch.Tensor]) -> torch.Tensor:
        """KV slots of absolute token indices given per request."""
        return torch.cat([self.slots[i][torch.as_tensor(a, dtype=torch.int64)]
                          for i, a in enumerate(per_request_abs)])

    def every_token(self) -> list[torch.Tensor]:
        """Per request, the absolute indices of its extend tokens."""
        return [torch.arange(r.prefix_len, r.seq_len) for r in self.requests]

    def by_layer(self, sets: Sequence[Optional[Sequence[torch.Tensor]]]) -> list[list[torch.Tensor]]:
        """sets[i][l] (S_l of request i; None: every token at every layer) -> [l][i], the layout
        `StandIn.stock_forward` takes."""
        layers = len(next(s for s in sets if s is not None))
        every = self.every_token()
        return [[every[i] if s is None else s[l] for i, s in enumerate(sets)] for l in range(layers)]


class StandIn:
    """The real SGLang model, pools and attention backend; see the module docstring."""

    def __init__(self, num_layers: int = 2, pool_size: int = 2048, max_requests: int = 32,
                 max_context: int = 256, seed: int = 0, tp_size: int = 1, tp_rank: int = 0,
                 init_file: Optional[str] = None) -> None:
        """tp_size > 1: this process is rank `tp_rank` of a tensor-parallel group (`ensure_cpu_runtime`):
        its shards of the model, its KV heads in the pool; the batches (tokens, slots) are the same on
        every rank."""
        ensure_cpu_runtime(tp_size, tp_rank, init_file)
        from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
        from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
        from sglang.srt.model_executor.forward_context import ForwardContext
        import sglang.srt.layers.rotary_embedding.base as rotary_base
        from sglang.srt.models.qwen2 import Qwen2Model

        self.config = text_config(num_layers)
        self.num_layers = num_layers
        # Off CUDA, RotaryEmbedding.__init__ imports vllm's rotary kernel unless the host counts as a
        # CPU engine (SGLANG_USE_CPU_ENGINE=1, which would also route ops to sgl_kernel's CPU build).
        # Only the constructor reads this flag; forward dispatches to forward_native either way.
        with mock.patch.object(rotary_base, "_is_cpu", True):
            self.lm = Qwen2Model(self.config)
        self.lm.eval()
        _randomize(self.lm, seed, None if tp_size == 1 else seed + 1000 * (tp_rank + 1))
        self.kv_heads = KV_HEADS // tp_size
        self.rotary = self.lm.layers[0].self_attn.rotary_emb
        self.inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))

        self.pool = MHATokenToKVPool(size=pool_size, page_size=1, dtype=torch.float32, head_num=self.kv_heads,
                                     head_dim=HEAD_DIM, layer_num=num_layers, device="cpu",
                                     enable_memory_saver=False, enable_alt_stream=False)
        gen = torch.Generator().manual_seed(seed + 1 + 1000 * tp_rank)
        for buf in (*self.pool.k_buffer, *self.pool.v_buffer):  # never-written slots hold noise
            buf.copy_(torch.randn(buf.shape, generator=gen))
        self.allocator = TokenToKVPoolAllocator(pool_size, torch.float32, "cpu", self.pool, need_sort=False)
        self.req_to_token_pool = ReqToTokenPool(size=max_requests, max_context_len=max_context, device="cpu",
                                                enable_memory_saver=False)
        self.req_to_token = self.req_to_token_pool.req_to_token
        runner = SimpleNamespace(device="cpu", req_to_token_pool=self.req_to_token_pool,
                                 token_to_kv_pool=self.pool)
        self.backend = TorchNativeAttnBackend(runner)
        self._context = ForwardContext(attn_backend=self.backend)
        self._gen = torch.Generator().manual_seed(seed + 2)
        self._free_rows = list(range(max_requests))

    # ---- SGLang's forward context (where both paths find the pools) ----------------------------

    @contextlib.contextmanager
    def forward_context(self):
        from sglang.srt.model_executor.forward_context import forward_context

        with forward_context(self._context), torch.no_grad():
            yield

    # ---- batches ---------------------------------------------------------------------------------

    def make_batch(self, requests: Sequence[RequestSpec], prefill_prefix: bool = True,
                   token_ids: Optional[Sequence[Optional[torch.Tensor]]] = None) -> Batch:
        """Rows and (shuffled, non-contiguous) slots for each request, written to req_to_token; the
        cached prefixes computed into the pool by a stock prefill (`prefill_prefix`), else left as noise.
        token_ids: each request's tokens (None: random)."""
        requests = list(requests)
        req_rows, slots, ids = [], [], []
        for i, spec in enumerate(requests):
            got = self.allocator.alloc(spec.seq_len)
            if got is None or not self._free_rows:
                raise RuntimeError("stand-in pools exhausted: free() batches, or build_standin(pool_size=, "
                                   "max_requests=) larger")
            row = self._free_rows.pop(0)
            got = got[torch.randperm(spec.seq_len, generator=self._gen)].to(torch.int64)
            self.req_to_token[row, : spec.seq_len] = got.to(self.req_to_token.dtype)
            req_rows.append(row)
            slots.append(got)
            given = token_ids[i] if token_ids is not None else None
            ids.append(given if given is not None else torch.randint(0, VOCAB, (spec.seq_len,), generator=self._gen))
        if prefill_prefix and any(r.prefix_len for r in requests):
            idx = [i for i, r in enumerate(requests) if r.prefix_len]
            head = self._batch([RequestSpec(requests[i].prefix_len, 0, requests[i].images) for i in idx],
                               [req_rows[i] for i in idx], [slots[i] for i in idx], [ids[i] for i in idx],
                               [mrope_positions(requests[i]) for i in idx])
            self.stock_forward(head)
        return self._batch(requests, req_rows, slots, ids, [mrope_positions(r) for r in requests])

    def free(self, batch: Batch) -> None:
        """Give a batch's req_to_token rows and KV slots back."""
        for row, slots in zip(batch.req_rows, batch.slots):
            self.allocator.free(slots)
            self._free_rows.append(row)

    def _batch(self, requests, req_rows, slots, ids, positions) -> Batch:
        from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

        prefix = [r.prefix_len for r in requests]
        extend = [r.extend_len for r in requests]
        seq = [p + e for p, e in zip(prefix, extend)]
        offsets = [0]
        for n in extend:
            offsets.append(offsets[-1] + n)
        input_ids = torch.cat([t[p:s] for t, p, s in zip(ids, prefix, seq)])
        pos = torch.cat([q[:, p:s] for q, p, s in zip(positions, prefix, seq)], dim=1).contiguous()
        out_cache_loc = torch.cat([sl[p:s] for sl, p, s in zip(slots, prefix, seq)])
        fb = ForwardBatch(
            forward_mode=ForwardMode.EXTEND,
            batch_size=len(requests),
            input_ids=input_ids,
            req_pool_indices=torch.tensor(req_rows, dtype=torch.int64),
            seq_lens=torch.tensor(seq, dtype=torch.int64),
            out_cache_loc=out_cache_loc,
            seq_lens_sum=sum(seq),
            seq_lens_cpu=torch.tensor(seq, dtype=torch.int64),
            positions=pos[0].clone(),
            mrope_positions=pos,
            extend_num_tokens=offsets[-1],
            extend_seq_lens=torch.tensor(extend, dtype=torch.int32),
            extend_prefix_lens=torch.tensor(prefix, dtype=torch.int32),
            extend_start_loc=torch.tensor(offsets[:-1], dtype=torch.int32),
            extend_prefix_lens_cpu=prefix,
            extend_seq_lens_cpu=extend,
        )
        return Batch(requests, list(req_rows), list(slots), input_ids, pos, fb, offsets, list(ids))

    # ---- the stock reference -----------------------------------------------------------------------

    def stock_forward(self, batch: Batch,
                      layer_sets: Optional[Sequence[Sequence[torch.Tensor]]] = None) -> torch.Tensor:
        """[n, hidden] final hidden states from SGLang's own code, with torch_native attention.

        layer_sets None: `Qwen2Model.forward` itself over every extend token. Else layer_sets[l][i]
        is S_l of request i (absolute token indices, S_l ⊆ S_{l-1}): SGLang's decoder layers run
        over every extend token (Qwen2Model.forward's loop), but at layer l the pool keeps its K/V
        for tokens outside S_l (their writes are dropped), so a token of S_l attends the pool's K/V
        of every earlier position. Only the rows of the last S_l hold the reference's output."""
        fb = batch.forward_batch
        with self.forward_context():
            self.backend.init_forward_metadata(fb)
            if layer_sets is None:
                return self.lm(batch.input_ids, batch.positions, fb)
            keep = []
            for sets in layer_sets:
                mask = torch.zeros(batch.num_tokens, dtype=torch.bool)
                mask[batch.rows_of(sets)] = True
                keep.append(mask)
            with self._writes_only(keep):
                hidden, residual = self.lm.embed_tokens(batch.input_ids), None
                for i in range(self.lm.start_layer, self.lm.end_layer):
                    hidden, residual = self.lm.layers[i](batch.positions, hidden, fb, residual)
                hidden, _ = self.lm.norm(hidden, residual)
            return hidden

    @contextlib.contextmanager
    def _writes_only(self, keep: list[torch.Tensor]):
        """pool.set_kv_buffer writes only the extend rows keep[layer_id] (an instance override)."""
        from sglang.srt.mem_cache.memory_pool import unwrap_write_loc

        pool, stock = self.pool, self.pool.set_kv_buffer

        def set_kv_buffer(layer, loc_info, cache_k, cache_v, *args, **kwargs):
            loc, _, _ = unwrap_write_loc(loc_info)
            m = keep[layer.layer_id]
            assert loc.shape[0] == m.shape[0], "a masked write sees the whole extend batch"
            return stock(layer, loc[m], cache_k[m], cache_v[m], *args, **kwargs)

        pool.set_kv_buffer = set_kv_buffer
        try:
            yield
        finally:
            del pool.set_kv_buffer

    # ---- pool contents -----------------------------------------------------------------------------

    def snapshot_kv(self) -> list[torch.Tensor]:
        return [b.clone() for b in (*self.pool.k_buffer, *self.pool.v_buffer)]

    def restore_kv(self, snapshot: list[torch.Tensor]) -> None:
        for buf, saved in zip((*self.pool.k_buffer, *self.pool.v_buffer), snapshot):
            buf.copy_(saved)

    def kv(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool.k_buffer[layer][slots].clone(), self.pool.v_buffer[layer][slots].clone()

    def write_kv(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.pool.k_buffer[layer][slots] = k
        self.pool.v_buffer[layer][slots] = v

    def reuse_copy(self, batch: Batch, layer_sets: Sequence[Sequence[torch.Tensor]]) -> dict:
        """What a reuse copy leaves: at every layer l, fresh random K/V in the slots of the extend
        tokens outside S_l (layer_sets[l][i], as stock_forward takes). {layer: (slots, k, v)}."""
        every = batch.slots_of(batch.every_token())
        written = {}
        for layer, sets in enumerate(layer_sets):
            dropped = every[~torch.isin(every, batch.slots_of(sets))]
            if dropped.numel():
                written[layer] = (dropped, *self.random_kv(dropped.numel()))
                self.write_kv(layer, *written[layer])
        return written

    def random_kv(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(n, self.kv_heads, HEAD_DIM, generator=self._gen),
                torch.randn(n, self.kv_heads, HEAD_DIM, generator=self._gen))


def build_standin(num_layers: int = 2, **kwargs) -> StandIn:
    return StandIn(num_layers=num_layers, **kwargs)
