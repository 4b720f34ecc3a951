"""LayerSelector: one request chunk's S_0 .. S_{L-1}, decided as the decoder loop reaches each layer.

The decoder loop asks `ready(l)`; where it is False the policy observes at l, and the loop first
computes QKV for the tokens of S_{l-1}, hands the reused ones' fresh and cached K/V to `observe`,
and only then writes K/V (fresh for S_l, the cached K/V stays for the reused tokens left out).
Layers a policy decides without looking are selected as soon as the previous layer is known, so a
static policy (none, full, first_k, vlcache) is planned completely here, on the scheduler, before
the forward; an observing one (cacheblend, error_bounded) up to its check layer.

A probing policy (error/image_bounded with a check sample below 1) computes only a sample of the
reused tokens up to its check layer; its observation there decides the reused tokens of every layer
(`replan`), the selector records that static plan from layer 0, and the decoder loop starts over.
What the probe computed stays charged.

`changed[l]` says whether S_l differs from S_{l-1} (sets are nested, so a size comparison decides
it); consumers use it to reuse the previous layer's gathered rows and attention plan.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from vlcache_sglang.recompute_policy import LayerObservation, RecomputePolicy, TokenLayout


@dataclasses.dataclass(frozen=True)
class ReuseOutcome:
    """What one request chunk computed of its reused tokens (for stats and cached_tokens)."""

    reused_tokens: int  # reused image tokens in this chunk
    computed_token_layers: int  # Σ_l reused tokens whose QKV layer l computed (the honest cost)
    recomputed_last_layer: int  # reused tokens still computed at the last layer
    num_layers: int
    computed_tokens: int  # reused tokens some layer computed (S_0's; a probe's sample and plan)

    @property
    def recomputed_fraction(self) -> float:
        total = self.reused_tokens * self.num_layers
        return self.computed_token_layers / total if total else 0.0


class LayerSelector:
    def __init__(self, policy: RecomputePolicy, layout: TokenLayout, num_layers: int) -> None:
        self.policy = policy
        self.layout = layout
        self.num_layers = num_layers
        self.sets: list[Optional[torch.Tensor]] = [None] * num_layers
        self.changed: list[bool] = [True] * num_layers
        self._reused_in_set: list[int] = [0] * num_layers  # reused tokens in S_l
        self._qkv_reused: list[int] = [0] * num_layers  # reused tokens whose QKV layer l computed
        self._probe_token_layers = 0  # what a probe's pass computed of the reused tokens, before its replan
        self._probe_first: Optional[torch.Tensor] = None  # the probe's S_0, kept once its replan decided
        # Nothing reused, nothing to probe: the check sees no token and decides nothing new, so the
        # loop need not start over for it.
        self._probes = policy.probes and bool(layout.reused_images)
        self._next = 0  # layers [0, _next) are decided
        if not policy.observes(num_layers):
            for layer, s in enumerate(policy.plan(layout, num_layers)):
                self._record(layer, s, observed=False)
            self._next = num_layers
        else:
            self._advance()

    # ----- what the decoder loop asks -------------------------------------------------------------

    def ready(self, layer: int) -> bool:
        """S_layer is known (else the policy observes there: call observe first)."""
        return layer < self._next

    @property
    def replanned(self) -> bool:
        """A probe decided: the sets are its static plan from layer 0."""
        return self._probe_first is not None

    @property
    def probing(self) -> bool:
        """The policy probes and has not decided yet: this pass ends at its check layer."""
        return self._probes and not self.replanned

    @property
    def layer_invariant(self) -> bool:
        """Every layer computes the same tokens, all known now (the CUDA-graph path can run it)."""
        return self._next == self.num_layers and not any(self.changed[1:])

    def candidates(self, layer: int) -> torch.Tensor:
        """The reused tokens of S_{layer-1}: what an observation at `layer` must cover."""
        if layer == 0 or not self.ready(layer - 1):
            raise ValueError(f"no S_(l-1) to observe at layer {layer}")
        previous = self.sets[layer - 1]
        return previous[self.layout.is_reused(previous)]

    def observe(self, layer: int, observation: LayerObservation) -> torch.Tensor:
        """Decide S_layer from the observation (fresh vs cached K/V of `candidates(layer)`)."""
        if layer != self._next or not self.policy.observes_at(layer):
            raise ValueError(f"layer {layer} is not awaiting an observation (next undecided: {self._next})")
        if self._probes:
            self._replan(layer, self.policy.replan(self.layout, self.num_layers, observation))
            return self.sets[layer]
        previous = self.sets[layer - 1]
        chosen = self.policy.select(self.layout, layer, self.num_layers, previous, observation)
        self._record(layer, chosen, observed=True)
        self._next = layer + 1
        self._advance()
        return chosen

    def charge_first_set(self) -> None:
        """The CUDA-graph path ran S_0 through every layer (writing only S_l's K/V at layer l): what
        it computed of the reused tokens is S_0's count at every layer, not S_l's."""
        if self._next != self.num_layers:
            raise ValueError("only a plan decided at every layer runs in a graph")
        self._qkv_reused = [self._reused_in_set[0]] * self.num_layers

    def outcome(self) -> ReuseOutcome:
        if self._next != self.num_layers:
            raise ValueError(f"layers {self._next}..{self.num_layers - 1} were never decided")
        return ReuseOutcome(
            reused_tokens=sum(img.num_tokens for img in self.layout.reused_images),
            computed_token_layers=sum(self._qkv_reused) + self._probe_token_layers,
            recomputed_last_layer=self._reused_in_set[-1],
            num_layers=self.num_layers,
            computed_tokens=self._computed_tokens(),
        )

    def _computed_tokens(self) -> int:
        if self._probe_first is None:
            return self._reused_in_set[0]  # S_0 is the widest set
        both = torch.unique(torch.cat([self._probe_first, self.sets[0]]))
        return int(self.layout.is_reused(both).sum())

    # ----- internals ------------------------------------------------------------------------------

    def _advance(self) -> None:
        while self._next < self.num_layers and not self.policy.observes_at(self._next):
            layer = self._next
            previous = self.sets[layer - 1] if layer else None
            self._record(layer, self.policy.next_set(self.layout, layer, self.num_layers, previous), observed=False)
            self._next += 1

    def _replan(self, probed: int, reused: torch.Tensor) -> None:
        """The probe's decision at layer `probed`: base ∪ `reused` at every layer, from layer 0. Its
        pass computed layers < probed in full for the sample and QKV at `probed`: charged."""
        if not bool(torch.isin(reused, self.layout.reused_tokens()).all()):
            raise RuntimeError(f"policy {self.policy.name!r} replanned tokens that are not reused image tokens")
        self._probe_token_layers = sum(self._qkv_reused[:probed]) + self._reused_in_set[probed - 1]
        self._probe_first = self.sets[0]
        plan = torch.sort(torch.cat([self.layout.base_tokens(), reused])).values
        for layer in range(self.num_layers):  # one object at every layer: unchanged after layer 0
            self._record(layer, plan, observed=False)
        self._next = self.num_layers

    def _record(self, layer: int, s: torch.Tensor, observed: bool) -> None:
        previous = self.sets[layer - 1] if layer else None
        self.sets[layer] = s
        self.changed[layer] = previous is None or s.numel() != previous.numel()
        # An unchanged set has the previous layer's count: no pass over a 42K-token set per layer.
        self._reused_in_set[layer] = (int(self.layout.is_reused(s).sum()) if self.changed[layer]
                                      else self._reused_in_set[layer - 1])
        # Where the policy observed, the layer computed QKV for all of S_{l-1}, not just S_l.
        self._qkv_reused[layer] = self._reused_in_set[layer - 1] if observed else self._reused_in_set[layer]
