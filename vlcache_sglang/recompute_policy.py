"""Recompute policies: which tokens of the reused images each layer recomputes.

A request's tokens are described by a `TokenLayout` (matched prefix, images and which of them are
reused from the multimodal store). At every layer l a policy yields `S_l`, the sorted absolute
indices of the tokens the model computes at that layer. The contract, enforced by
`RecomputePolicy.select` for every policy:

* nested: S_{l+1} ⊆ S_l — a token left out at layer l has no hidden state for layer l+1;
* every *base* token (each token after the prefix that is not part of a reused image: new text,
  images seen for the first time) is in every S_l;
* the reused-image tokens of S_l never exceed the policy's budget for layer l.

A token of S_l gets fresh K/V at layer l; a reused token outside S_l keeps its cached (rotated) K/V.
Static policies (none, full, first_k, vlcache) decide from the layout alone and are planned for all
layers on the scheduler. A policy that *observes* at layer l (`observes_at(l)`: cacheblend,
error_bounded, image_bounded at their check layer) decides S_l from a `LayerObservation`: the fresh and the cached
K/V of the reused tokens of S_{l-1}, computed by the decoder loop before anything is written
(`layer_selector.py` runs this protocol for one request). A policy that *probes* (`probes`:
error/image_bounded with check_sample < 1) computes only a sample up to its check layer; its
observation there decides, by `replan`, a new plan for every layer from 0 (any reused tokens, so
nesting holds for the plan, not against the probe's sets), and the decoder loop starts over.
Policies are registered by name, like SGLang's radix-cache backends.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional

import torch


@dataclass(frozen=True)
class ImageSpan:
    """An image's run of tokens in the request: [start, start + num_tokens)."""

    start: int
    num_tokens: int
    reused: bool  # True: its KV comes from the multimodal store; False: computed like text
    # Tokens of the same image before `start`: non-zero when a prefill chunk holds only the image's
    # tail, so policies that pick by place in the image (first_k) see where the span really sits.
    offset_in_image: int = 0
    # Tokens of the whole image (0: this span is the whole image). Ratio-based policies size an
    # image's recomputed head from it, so a chunk boundary does not change which tokens they pick.
    image_tokens: int = 0

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def whole_image_tokens(self) -> int:
        return self.image_tokens or self.offset_in_image + self.num_tokens

    def head_tokens(self, head_len: int) -> torch.Tensor:
        """Absolute indices of this span's tokens among the image's first `head_len`."""
        n = min(max(0, head_len - self.offset_in_image), self.num_tokens)
        return torch.arange(self.start, self.start + n)


@dataclass(frozen=True)
class TokenLayout:
    """Token layout of one request (or one prefill chunk of it: seq_len = chunk end)."""

    seq_len: int
    prefix_len: int  # tokens served by an exact radix prefix hit; never computed
    images: tuple[ImageSpan, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.prefix_len <= self.seq_len:
            raise ValueError(f"need 0 <= prefix_len <= seq_len, got {self.prefix_len=}, {self.seq_len=}")
        prev_end = 0
        for img in self.images:
            if img.num_tokens <= 0 or img.start < prev_end or img.end > self.seq_len:
                raise ValueError(
                    f"images must be non-empty, sorted, disjoint and inside [0, {self.seq_len}); "
                    f"got {img} after a span ending at {prev_end}"
                )
            if img.reused and img.start < self.prefix_len:
                raise ValueError(
                    f"a reused image must lie after the matched prefix ({self.prefix_len}); got {img}"
                )
            prev_end = img.end

    @property
    def reused_images(self) -> tuple[ImageSpan, ...]:
        return tuple(img for img in self.images if img.reused)

    def reused_tokens(self) -> torch.Tensor:
        """Sorted indices of all reused-image tokens (the only tokens a policy may skip)."""
        runs = [torch.arange(img.start, img.end) for img in self.reused_images]
        return torch.cat(runs) if runs else torch.empty(0, dtype=torch.long)

    def is_reused(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mask of `tokens` (absolute indices) that lie in a reused image; O(len(tokens) x images),
        so later layers test their few active tokens without materialising all reused ones."""
        mask = torch.zeros(tokens.shape, dtype=torch.bool)
        for img in self.reused_images:
            mask |= (tokens >= img.start) & (tokens < img.end)
        return mask

    def base_tokens(self) -> torch.Tensor:
        """Sorted indices every layer must compute: the extend tokens outside reused images."""
        keep = torch.ones(self.seq_len - self.prefix_len, dtype=torch.bool)
        for img in self.reused_images:
            keep[img.start - self.prefix_len : img.end - self.prefix_len] = False
        return torch.nonzero(keep).flatten() + self.prefix_len


def ratio_count(ratio: float, n: int) -> int:
    """Tokens a ratio buys out of n: VLCache's max(1, floor(r * n)) when r > 0, none when r == 0."""
    if ratio <= 0.0 or n <= 0:
        return 0
    return min(n, max(1, int(ratio * n)))


@dataclass(frozen=True)
class PolicyParams:
    recompute_ratio: float = 0.05  # ratio-based policies: share of reused tokens to recompute
    first_k: int = 32  # first_k: tokens at the start of each reused image
    # vlcache: r_0..r_{L-1} (non-increasing, mean = recompute_ratio; layer_profile.layer_ratios).
    # None: uniform, every layer recomputes recompute_ratio of each image.
    layer_ratios: Optional[tuple[float, ...]] = None
    check_layer: int = 1  # cacheblend / error_bounded: the layer whose K/V deviation decides
    blend_score: str = "k"  # cacheblend ranks by the deviation of "k" (LMCache) or "v" (authors' code)
    error_bound: float = 0.1  # error_bounded: the largest relative K/V error served from cache
    # error/image_bounded: share of each reused image the layers up to the check layer compute (a
    # strided sample plus the floor); below 1 the check is a probe and its decision replans every layer.
    check_sample: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.recompute_ratio <= 1.0:
            raise ValueError(f"recompute_ratio must lie in [0, 1], got {self.recompute_ratio}")
        if self.first_k < 0:
            raise ValueError(f"first_k must be >= 0, got {self.first_k}")
        if self.check_layer < 1:
            raise ValueError(
                f"check_layer must be >= 1, got {self.check_layer}: layer-0 K/V depend only on token and "
                "position, so a rotated cached K/V never deviates there"
            )
        if self.blend_score not in ("k", "v"):
            raise ValueError(f"blend_score must be 'k' or 'v', got {self.blend_score!r}")
        if not self.error_bound >= 0.0:
            raise ValueError(f"error_bound must be >= 0, got {self.error_bound}")
        if not 0.0 < self.check_sample <= 1.0:
            raise ValueError(f"check_sample must lie in (0, 1] (1: the check layer sees every reused token), "
                             f"got {self.check_sample}")
        if self.layer_ratios is not None:
            r = self.layer_ratios
            if any(not 0.0 <= x <= 1.0 for x in r) or any(b > a for a, b in zip(r, r[1:])):
                raise ValueError(f"layer_ratios must be non-increasing values in [0, 1], got {list(r)}")


@dataclass(frozen=True)
class LayerObservation:
    """What an observing policy sees at layer l, before any K/V of that layer is written.

    tokens:   [n] int64 CPU, sorted absolute indices: the reused tokens of S_{l-1}
    k_fresh:  [n, kv_heads * head_dim] the K this layer computed for them (after RoPE)
    k_cached: [n, kv_heads * head_dim] the cached K in their slots (rotated to this request)
    v_fresh, v_cached: the same for V
    (device tensors of the model's / the KV pool's dtype)
    sum_ranks: sums a per-token tensor over the tensor-parallel ranks (identity on one GPU). Under
        TP a rank holds only its KV heads, so every norm is taken over all heads by summing the
        squares across ranks first: each rank then scores, and therefore selects, alike.
    """

    tokens: torch.Tensor
    k_fresh: torch.Tensor
    k_cached: torch.Tensor
    v_fresh: torch.Tensor
    v_cached: torch.Tensor
    sum_ranks: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda t: t, compare=False, repr=False)
    _cache: dict = field(default_factory=dict, init=False, compare=False, repr=False)  # _squares' results

    def __post_init__(self) -> None:
        n = self.tokens.shape[0]
        shapes = [tuple(t.shape) for t in (self.k_fresh, self.k_cached, self.v_fresh, self.v_cached)]
        if self.tokens.dim() != 1 or any(len(sh) != 2 or sh[0] != n for sh in shapes):
            raise ValueError(f"tokens [n] and K/V [n, d] must agree, got {tuple(self.tokens.shape)} and {shapes}")

    def _squares(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """([n] ‖fresh − cached‖₂², [n] ‖fresh‖₂²) of K ("k") or V ("v") per token over every KV head of
        the model (all ranks' squares summed). Computed once per observation: every measure below
        reads them, and under TP each sum is an all-reduce. (Not functools.cached_property: before
        Python 3.12 it holds one lock for all instances, which deadlocks ranks that all-reduce inside.)"""
        cache = self._cache
        if which not in cache:
            fresh, cached = (self.k_fresh, self.k_cached) if which == "k" else (self.v_fresh, self.v_cached)
            f = fresh.float()
            cache[which] = (self.sum_ranks((f - cached.float()).square().sum(dim=-1)),
                            self.sum_ranks(f.square().sum(dim=-1)))
        return cache[which]

    def deviation(self, which: str = "k") -> torch.Tensor:
        """[n] float32 CPU: ‖fresh − cached‖₂ of each token's K (or V) over all KV heads."""
        return self._squares(which)[0].sqrt().cpu()

    def relative_error(self) -> torch.Tensor:
        """[n] float32 CPU: max over K and V of ‖fresh − cached‖ / ‖fresh‖ (the error_bounded measure)."""
        errs = [num.sqrt() / den.sqrt().clamp_min(1e-12) for num, den in map(self._squares, "kv")]
        return torch.maximum(errs[0], errs[1]).cpu()

    def group_relative_error(self, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
        """[num_groups] float32 CPU: per group of tokens (groups: [n] ids in [0, num_groups)), the max
        over K and V of sqrt(Σ ‖fresh − cached‖²) / sqrt(Σ ‖fresh‖²) over the group's tokens."""
        ids = groups.to(self.k_fresh.device)
        errs = []
        for num, den in map(self._squares, "kv"):
            zeros = torch.zeros(num_groups, dtype=torch.float32, device=num.device)
            errs.append((zeros.index_add(0, ids, num) / zeros.index_add(0, ids, den).clamp_min(1e-24)).sqrt())
        return torch.maximum(errs[0], errs[1]).cpu()


class RecomputePolicy(ABC):
    """Chooses, layer by layer, which reused-image tokens to recompute."""

    name: ClassVar[str]
    # S_l is the same at every layer (none, full, first_k): plan() selects once. A plan is made per
    # request on the scheduler, where each small torch op costs tens of microseconds. A subclass
    # whose _choose depends on the layer must set it back to False.
    same_set_every_layer: ClassVar[bool] = False
    # The check sample this policy runs with when neither the server nor the request sets one
    # (`default_check_sample`): 1, a plain check, for every policy but image_bounded.
    default_check_sample: ClassVar[float] = 1.0

    def __init__(self, params: PolicyParams = PolicyParams()) -> None:
        self.params = params

    def observes_at(self, layer: int) -> bool:
        """True where S_layer is decided from that layer's LayerObservation (not known in advance)."""
        return False

    def observes(self, num_layers: int) -> bool:
        return any(self.observes_at(layer) for layer in range(num_layers))

    def repeats_previous(self, layer: int, num_layers: int) -> bool:
        """S_layer is S_{layer-1} by construction, so no select is needed: each costs ~0.3 ms of host
        time (a request chunk's 28 selects ~8 ms on the dev CPU, in the scheduler or, after an
        observation, inside the forward)."""
        return layer > 0 and self.same_set_every_layer

    @property
    def probes(self) -> bool:
        """True when the layers up to the check layer compute only a sample of the reused tokens, so
        the observation there cannot choose among S_{l-1} alone: it decides, by `replan`, the reused
        tokens every layer computes, and the decoder loop starts over from layer 0."""
        return False

    def replan(self, layout: TokenLayout, num_layers: int, observation: LayerObservation) -> torch.Tensor:
        """A probing policy's decision: the reused tokens that every layer computes (any of them, not
        only the observed ones)."""
        raise NotImplementedError(f"policy {self.name!r} does not probe")

    @abstractmethod
    def budget(self, layout: TokenLayout, layer: int, num_layers: int) -> int:
        """Most reused-image tokens this policy may recompute at `layer`."""

    @abstractmethod
    def _choose(
        self,
        layout: TokenLayout,
        layer: int,
        num_layers: int,
        candidates: torch.Tensor,
        observation: Optional[LayerObservation],
    ) -> torch.Tensor:
        """Subset of `candidates` (reused tokens active at the previous layer) to keep computing."""

    def select(
        self,
        layout: TokenLayout,
        layer: int,
        num_layers: int,
        previous: Optional[torch.Tensor],
        observation: Optional[LayerObservation] = None,
    ) -> torch.Tensor:
        """S_layer: sorted int64 token indices. `previous` is S_{layer-1} (None at layer 0)."""
        if not 0 <= layer < num_layers:
            raise ValueError(f"layer {layer} outside [0, {num_layers})")
        if (previous is None) != (layer == 0):
            raise ValueError("pass previous=None exactly at layer 0 and S_{l-1} after it")
        if self.observes_at(layer) and observation is None:
            raise ValueError(f"policy {self.name!r} decides layer {layer} from a LayerObservation; none was given")
        # After layer 0 everything comes from S_{l-1} (small): a 4x4K request has 42K reused tokens,
        # and touching all of them 28 times cost ~30 ms of scheduler time per request.
        if previous is None:
            candidates, base = layout.reused_tokens(), layout.base_tokens()
        else:
            reused_mask = layout.is_reused(previous)
            candidates, base = previous[reused_mask], previous[~reused_mask]
        if observation is not None and not torch.equal(observation.tokens, candidates):
            raise ValueError(f"the observation at layer {layer} must cover exactly the reused tokens of S_(l-1)")
        chosen = torch.unique(self._choose(layout, layer, num_layers, candidates, observation))
        if not bool(torch.isin(chosen, candidates).all()):
            raise RuntimeError(f"policy {self.name!r} chose tokens outside the candidates (breaks nesting)")
        budget = self.budget(layout, layer, num_layers)
        if chosen.numel() > budget:
            raise RuntimeError(
                f"policy {self.name!r} chose {chosen.numel()} tokens at layer {layer}, budget {budget}"
            )
        if previous is not None and chosen.numel() == candidates.numel():
            return previous  # S_l == S_{l-1}
        return torch.sort(torch.cat([base, chosen])).values

    def plan(self, layout: TokenLayout, num_layers: int) -> list[torch.Tensor]:
        """S_0 .. S_{L-1} at once, for policies that observe at no layer."""
        if self.observes(num_layers):
            raise ValueError(f"policy {self.name!r} decides from observations; use a LayerSelector")
        sets: list[torch.Tensor] = []
        for layer in range(num_layers):
            sets.append(self.next_set(layout, layer, num_layers, sets[-1] if layer else None))
        return sets

    def next_set(self, layout: TokenLayout, layer: int, num_layers: int,
                 previous: Optional[torch.Tensor]) -> torch.Tensor:
        """S_layer of a layer decided without an observation: the previous set itself where it repeats
        (no select), else `select`."""
        if self.repeats_previous(layer, num_layers):
            return previous
        return self.select(layout, layer, num_layers, previous)


_POLICIES: dict[str, type[RecomputePolicy]] = {}


def register_recompute_policy(cls: type[RecomputePolicy]) -> type[RecomputePolicy]:
    """Class decorator: make a policy selectable by `--vlcache-policy <cls.name>`."""
    if cls.name in _POLICIES:
        raise ValueError(f"recompute policy {cls.name!r} is already registered")
    _POLICIES[cls.name] = cls
    return cls


def registered_recompute_policies() -> list[str]:
    return list(_POLICIES)


def _policy_class(name: str) -> type[RecomputePolicy]:
    if name not in _POLICIES:
        raise ValueError(f"unknown recompute policy {name!r}; registered: {registered_recompute_policies()}")
    return _POLICIES[name]


def default_check_sample(name: str) -> float:
    """The check sample of policy `name` where neither the server nor the request sets one."""
    return _policy_class(name).default_check_sample


def get_recompute_policy(name: str, params: PolicyParams = PolicyParams()) -> RecomputePolicy:
    return _policy_class(name)(params)


@register_recompute_policy
class NoRecompute(RecomputePolicy):
    """Pure reuse: every reused image token keeps its cached (rotated) KV at every layer."""

    name = "none"
    same_set_every_layer = True

    def budget(self, layout: TokenLayout, layer: int, num_layers: int) -> int:
        return 0

    def _choose(self, layout, layer, num_layers, candidates, observation) -> torch.Tensor:
        return candidates[:0]


@register_recompute_policy
class FullRecompute(RecomputePolicy):
    """Recompute everything: the baseline that must match stock SGLang."""

    name = "full"
    same_set_every_layer = True

    def budget(self, layout: TokenLayout, layer: int, num_layers: int) -> int:
        return sum(img.num_tokens for img in layout.reused_images)

    def _choose(self, layout, layer, num_layers, candidates, observation) -> torch.Tensor:
        return candidates


@register_recompute_policy
class FirstK(RecomputePolicy):
    """EPIC / MPIC: recompute the first k tokens of each reused image, at every layer."""

    name = "first_k"
    same_set_every_layer = True

    def budget(self, layout: TokenLayout, layer: int, num_layers: int) -> int:
        return _heads(layout, lambda img: self.params.first_k).numel()

    def _choose(self, layout, layer, num_layers, candidates, observation) -> torch.Tensor:
        return _among(candidates, _heads(layout, lambda img: self.params.first_k))


def _heads(layout: TokenLayout, head_len: Callable[[ImageSpan], int]) -> torch.Tensor:
    """Absolute indices of the leading head_len(img) tokens of every reused image (in this layout)."""
    heads = [img.head_tokens(head_len(img)) for img in layout.reused_images]
    return torch.cat(heads) if heads else torch.empty(0, dtype=torch.long)


def _among(candidates: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return candidates[torch.isin(candidates, tokens)]


def _strided(layout: TokenLayout, share: float) -> torch.Tensor:
    """Every round(1/share)-th token of each reused image, counted from the image's first token (so
    the prefill chunks of one image sample alike)."""
    step = max(1, round(1.0 / share))
    picked = []
    for img in layout.reused_images:
        first = (-img.offset_in_image) % step  # the span's first token whose place in the image is k*step
        picked.append(torch.arange(img.start + first, img.end, step))
    return torch.cat(picked) if picked else torch.empty(0, dtype=torch.long)


def _reused_count(layout: TokenLayout) -> int:
    return sum(img.num_tokens for img in layout.reused_images)


@register_recompute_policy
class VLCache(RecomputePolicy):
    """VLCache (Qin et al., arXiv 2512.12977): at layer l, recompute the leading
    n_{i,l} = max(1, floor(r_l * N_i)) tokens of each reused image i (N_i: the whole image's tokens).

    The earliest tokens first because reuse error cumulates along the image: a token's error is its
    own plus what it inherits from the reused tokens before it (e_total(k) = e_self(k) + Σ_{i<k}
    e_prop(i, k)), so a fresh head removes the error every later token would inherit. r_l comes
    from a calibrated per-layer profile (`layer_profile.layer_ratios`: non-increasing, so the sets
    stay nested, mean = --vlcache-recompute-ratio); without one every r_l is the ratio, and this
    is first_k with k = r * N_i.
    """

    name = "vlcache"

    def ratio(self, layer: int, num_layers: int) -> float:
        ratios = self.params.layer_ratios
        if ratios is None:
            return self.params.recompute_ratio
        if len(ratios) != num_layers:
            raise ValueError(f"the layer profile has {len(ratios)} ratios for a {num_layers}-layer model")
        return ratios[layer]

    def _head_tokens(self, layout: TokenLayout, layer: int, num_layers: int) -> torch.Tensor:
        r = self.ratio(layer, num_layers)
        return _heads(layout, lambda img: ratio_count(r, img.whole_image_tokens))

    def budget(self, layout: TokenLayout, layer: int, num_layers: int) -> int:
        return self._head_tokens(layout, layer, num_layers).numel()

    def _choose(self, layout, layer, num_layers, candidates, observation) -> torch.Tensor:
        return _among(candidates, self._head_tokens(layout, layer, num_layers))

    def repeats_previous(self, layer: int, num_layers: int) -> bool:
        # A run of equal r_l picks the same heads: a stepped profile selects once per step, a uniform one once.
        return layer > 0 and self.ratio(layer, num_layers) == self.ratio(layer - 1, num_layers)


class _CheckLayerPolicy(RecomputePolicy):
    """Every reused token is computed up to the check layer c; at c the policy sees their fresh and
    cached K/V and keeps a subset, which then runs to the last layer. Layers 0..c-1 in full plus the
    QKV of every reused token at c is what the measurement costs (counted as computed tokens)."""

    def observes_at(self, layer: int) -> bool:
        return layer == self.params.check_layer

    def repeats_previous(self, layer: int, num_layers: int) -> bool:
        # Before c every layer computes all reused tokens (a probe: its sample); after c, the kept ones.
        return layer > 0 and layer != self.params.check_layer

    def budget(self, layout: TokenLayout, layer: int, num_layers: int) -> int:
        return _reused_count(layout)

    def _choose(self, layout, layer, num_layers, candidates, observation) -> torch.Tensor:
        if layer != self.params.check_layer:
            return candidates  # all of them before c, the kept ones after it
        return self._keep(layout, candidates, observation)

    @abstractmethod
    def _keep(self, layout: TokenLayout, candidates: torch.Tensor, observation: LayerObservation) -> torch.Tensor:
        """The reused tokens to keep computing from the check layer on."""


@register_recompute_policy
class CacheBlend(_CheckLayerPolicy):
    """CacheBlend (Yao et al., EuroSys'25): rank the reused tokens by ‖fresh − cached‖ of K (LMCache)
    or V (the authors' code) at the check layer and keep the top r of them from there on."""

    name = "cacheblend"

    def budget(self, layout: TokenLayout, layer: int, num_layers: int) -> int:
        n = _reused_count(layout)
        return n if layer < self.params.check_layer else ratio_count(self.params.recompute_ratio, n)

    def _keep(self, layout, candidates, observation) -> torch.Tensor:
        k = min(ratio_count(self.params.recompute_ratio, _reused_count(layout)), candidates.numel())
        scores = observation.deviation(self.params.blend_score)
        return candidates[torch.topk(scores, k).indices]


@register_recompute_policy
class ErrorBounded(_CheckLayerPolicy):
    """Error-bounded reuse: the cache serves a reused token past the check layer c only if its K and
    V at c are within relative error τ (`error_bound`) of what the request computes itself:
    ‖fresh − cached‖₂ / ‖fresh‖₂ ≤ τ for both. Every token above τ is recomputed to the last layer,
    plus VLCache's floor (each image's leading max(1, floor(r * N)) tokens), so an image whose cached
    context differs a lot is recomputed in full and one whose context barely matters costs what
    `vlcache` costs (plus the check). The bound holds at c, where it is measured, not at later layers."""

    name = "error_bounded"

    @property
    def probes(self) -> bool:
        return self.params.check_sample < 1.0

    def _floor(self, layout: TokenLayout) -> torch.Tensor:
        r = self.params.recompute_ratio
        return _heads(layout, lambda img: ratio_count(r, img.whole_image_tokens))

    def _choose(self, layout, layer, num_layers, candidates, observation) -> torch.Tensor:
        if self.probes and layer < self.params.check_layer:  # the probe: the floor and a strided sample
            return _among(candidates, torch.cat([self._floor(layout), _strided(layout, self.params.check_sample)]))
        return super()._choose(layout, layer, num_layers, candidates, observation)

    def _keep(self, layout, candidates, observation) -> torch.Tensor:
        floor = _among(candidates, self._floor(layout))
        over = candidates[observation.relative_error() > self.params.error_bound]
        return torch.cat([floor, over])

    def replan(self, layout: TokenLayout, num_layers: int, observation: LayerObservation) -> torch.Tensor:
        """After a probe: the floor and the sampled tokens beyond τ, at every layer (a token outside the
        sample is not measured and stays cached: the bound holds for the sampled tokens)."""
        return torch.unique(self._keep(layout, observation.tokens, observation))


@register_recompute_policy
class ImageBounded(ErrorBounded):
    """error_bounded, decided per image as well: an image whose aggregate relative K/V error at the
    check layer, sqrt(Σ ‖fresh − cached‖²) / sqrt(Σ ‖fresh‖²) over all its reused tokens (max of K
    and V), exceeds τ is recomputed whole; any other image as error_bounded (its tokens above τ plus
    the floor). Why: error_bounded's bound holds only at c. When an image's cached context differs
    widely, its tokens still within τ at c drift at later layers (measured on the tiny model:
    error_bounded at τ 0.02 recomputed 92 % of the token-layers and still lost 5 points to `full`).
    The bound a user can state: every image served from cache past c is within τ at c, as a whole
    and token by token."""

    name = "image_bounded"
    # A probe over a tenth of each image: on the trained tiny models (H200, sixth session) the plain
    # check's answers in every regime, at 0.043 instead of 0.262 of the token-layers where no image
    # exceeds tau. Not error_bounded's: its bound is per token, and a probe leaves 9 in 10 unmeasured.
    default_check_sample = 0.1

    def _keep(self, layout, candidates, observation) -> torch.Tensor:
        kept = super()._keep(layout, candidates, observation)
        image_of, over = self._images_over(layout, candidates, observation)
        return torch.cat([kept, candidates[over[image_of]]])

    def replan(self, layout: TokenLayout, num_layers: int, observation: LayerObservation) -> torch.Tensor:
        """After a probe: an image whose sampled tokens' aggregate error exceeds τ is computed whole at
        every layer (its unsampled tokens included: the loop starts over from layer 0, so they have
        hidden states), any other as error_bounded's replan."""
        _, over = self._images_over(layout, observation.tokens, observation)
        whole = [torch.arange(img.start, img.end) for img, o in zip(layout.reused_images, over.tolist()) if o]
        return torch.unique(torch.cat([super().replan(layout, num_layers, observation), *whole]))

    def _images_over(self, layout: TokenLayout, candidates: torch.Tensor,
                     observation: LayerObservation) -> tuple[torch.Tensor, torch.Tensor]:
        """([n] each candidate's reused-image index, [images] whether that image's aggregate error over
        its candidates exceeds τ)."""
        starts = torch.tensor([img.start for img in layout.reused_images], dtype=torch.long)
        image_of = torch.searchsorted(starts, candidates, right=True) - 1
        over = observation.group_relative_error(image_of, starts.numel()) > self.params.error_bound
        return image_of, over
