"""Recompute policies: which tokens of the reused images each layer recomputes.

A request's tokens are described by a `TokenLayout` (matched prefix, images and which of them are
reused from the multimodal store). At every layer l a policy yields `S_l`, the sorted absolute
indices of the tokens the model computes at that layer. The contract, enforced by
`RecomputePolicy.select` for every policy:

* nested: S_{l+1} ⊆ S_l — a token left out at layer l has no hidden state for layer l+1;
* every *base* token (each token after the prefix that is not part of a reused image: new text,
  images seen for the first time) is in every S_l;
* the reused-image tokens of S_l never exceed the policy's budget for layer l.

Static policies (none, full, first_k) decide from the layout alone and can be planned for all
layers at once; a policy with `needs_observation = True` (CacheBlend, VLCache) decides at layer l
from a `LayerObservation` (that layer's K deviation of the still-active reused tokens).
Policies are registered by name, like SGLang's radix-cache backends.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Optional

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

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


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


@dataclass(frozen=True)
class PolicyParams:
    recompute_ratio: float = 0.05  # ratio-based policies: share of reused tokens to recompute
    first_k: int = 32  # first_k: tokens at the start of each reused image


@dataclass(frozen=True)
class LayerObservation:
    """What a deviation-driven policy sees at layer l for the reused tokens still active.

    tokens:      [n] int64, sorted absolute indices (the reused tokens of S_{l-1}, all at l=0)
    k_deviation: [n] float, ‖K_fresh − K_cached‖ of each of those tokens at layer l
    """

    tokens: torch.Tensor
    k_deviation: torch.Tensor

    def __post_init__(self) -> None:
        if self.tokens.shape != self.k_deviation.shape or self.tokens.dim() != 1:
            raise ValueError(
                f"tokens and k_deviation must be 1-D of equal length, got "
                f"{tuple(self.tokens.shape)} and {tuple(self.k_deviation.shape)}"
            )


class RecomputePolicy(ABC):
    """Chooses, layer by layer, which reused-image tokens to recompute."""

    name: ClassVar[str]
    needs_observation: ClassVar[bool] = False
    # S_l is the same at every layer (none, full, first_k): plan() selects once. A plan is made per
    # request on the scheduler, where each small torch op costs tens of microseconds. A subclass
    # whose _choose depends on the layer must set it back to False.
    same_set_every_layer: ClassVar[bool] = False

    def __init__(self, params: PolicyParams = PolicyParams()) -> None:
        self.params = params

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
        if self.needs_observation and observation is None:
            raise ValueError(f"policy {self.name!r} decides from a LayerObservation; none was given")
        # After layer 0 everything comes from S_{l-1} (small): a 4x4K request has 42K reused tokens,
        # and touching all of them 28 times cost ~30 ms of scheduler time per request.
        if previous is None:
            candidates, base = layout.reused_tokens(), layout.base_tokens()
        else:
            reused_mask = layout.is_reused(previous)
            candidates, base = previous[reused_mask], previous[~reused_mask]
        chosen = torch.unique(self._choose(layout, layer, num_layers, candidates, observation))
        if not bool(torch.isin(chosen, candidates).all()):
            raise RuntimeError(f"policy {self.name!r} chose tokens outside the candidates (breaks nesting)")
        budget = self.budget(layout, layer, num_layers)
        if chosen.numel() > budget:
            raise RuntimeError(
                f"policy {self.name!r} chose {chosen.numel()} tokens at layer {layer}, budget {budget}"
            )
        if previous is not None and chosen.numel() == candidates.numel():
            return previous  # S_l == S_{l-1}: the same object, so consumers can skip by identity
        return torch.sort(torch.cat([base, chosen])).values

    def plan(self, layout: TokenLayout, num_layers: int) -> list[torch.Tensor]:
        """S_0 .. S_{L-1} at once, for policies that need no per-layer observation."""
        if self.needs_observation:
            raise ValueError(f"policy {self.name!r} decides per layer; call select() layer by layer")
        if self.same_set_every_layer:
            return [self.select(layout, 0, num_layers, None)] * num_layers
        sets: list[torch.Tensor] = []
        previous: Optional[torch.Tensor] = None
        for layer in range(num_layers):
            previous = self.select(layout, layer, num_layers, previous)
            sets.append(previous)
        return sets


_POLICIES: dict[str, type[RecomputePolicy]] = {}


def register_recompute_policy(cls: type[RecomputePolicy]) -> type[RecomputePolicy]:
    """Class decorator: make a policy selectable by `--vlcache-policy <cls.name>`."""
    if cls.name in _POLICIES:
        raise ValueError(f"recompute policy {cls.name!r} is already registered")
    _POLICIES[cls.name] = cls
    return cls


def registered_recompute_policies() -> list[str]:
    return list(_POLICIES)


def get_recompute_policy(name: str, params: PolicyParams = PolicyParams()) -> RecomputePolicy:
    if name not in _POLICIES:
        raise ValueError(f"unknown recompute policy {name!r}; registered: {registered_recompute_policies()}")
    return _POLICIES[name](params)


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

    def _head_len(self, img: ImageSpan) -> int:
        """Tokens of this span among the image's first k (a chunk may hold only the image's tail)."""
        return min(max(0, self.params.first_k - img.offset_in_image), img.num_tokens)

    def budget(self, layout: TokenLayout, layer: int, num_layers: int) -> int:
        return sum(self._head_len(img) for img in layout.reused_images)

    def _choose(self, layout, layer, num_layers, candidates, observation) -> torch.Tensor:
        heads = [torch.arange(img.start, img.start + self._head_len(img)) for img in layout.reused_images]
        if not heads:
            return candidates[:0]
        heads_t = torch.cat(heads)
        return candidates[torch.isin(candidates, heads_t)]
