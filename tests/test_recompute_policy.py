from typing import Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlcache_sglang.recompute_policy import (
    ImageSpan,
    LayerObservation,
    PolicyParams,
    RecomputePolicy,
    TokenLayout,
    get_recompute_policy,
    registered_recompute_policies,
)

STATIC_POLICIES = ["none", "full", "first_k"]


@st.composite
def layouts(draw) -> TokenLayout:
    """Random requests: a prefix, then text runs and images (reused or not) in any order."""
    prefix = draw(st.integers(0, 40))
    pos, images = prefix, []
    for _ in range(draw(st.integers(0, 4))):
        pos += draw(st.integers(0, 30))  # text before this image
        n = draw(st.integers(1, 120))
        images.append(ImageSpan(pos, n, reused=draw(st.booleans())))
        pos += n
    seq_len = pos + draw(st.integers(0, 20))
    return TokenLayout(seq_len=max(seq_len, 1), prefix_len=min(prefix, max(seq_len, 1)), images=tuple(images))


def _check_contract(policy: RecomputePolicy, layout: TokenLayout, sets: list[torch.Tensor]) -> None:
    base = layout.base_tokens()
    reused = layout.reused_tokens()
    for layer, s in enumerate(sets):
        assert torch.equal(s, torch.sort(torch.unique(s)).values), "sorted, no duplicates"
        assert bool(torch.isin(base, s).all()), "every new token at every layer"
        assert bool(((s >= layout.prefix_len) & (s < layout.seq_len)).all())
        n_reused = int(torch.isin(s, reused).sum())
        assert n_reused <= policy.budget(layout, layer, len(sets))
        if layer:
            assert bool(torch.isin(s, sets[layer - 1]).all()), "nested: S_l ⊆ S_{l-1}"


@pytest.mark.parametrize("name", STATIC_POLICIES)
@given(layout=layouts(), num_layers=st.integers(1, 6), k=st.integers(0, 64))
@settings(max_examples=60, deadline=None)
def test_static_policies_keep_the_contract(name, layout, num_layers, k):
    policy = get_recompute_policy(name, PolicyParams(first_k=k))
    sets = policy.plan(layout, num_layers)
    assert len(sets) == num_layers
    _check_contract(policy, layout, sets)
    again = get_recompute_policy(name, PolicyParams(first_k=k)).plan(layout, num_layers)
    assert all(torch.equal(a, b) for a, b in zip(sets, again)), "deterministic"


@given(layout=layouts())
@settings(max_examples=40, deadline=None)
def test_none_full_first_k_pick_what_they_say(layout):
    base, reused = layout.base_tokens(), layout.reused_tokens()
    assert torch.equal(get_recompute_policy("none").plan(layout, 2)[1], base)
    full = get_recompute_policy("full").plan(layout, 2)[1]
    assert torch.equal(full, torch.arange(layout.prefix_len, layout.seq_len))
    first = get_recompute_policy("first_k", PolicyParams(first_k=3)).plan(layout, 2)[1]
    want = [i for img in layout.reused_images for i in range(img.start, min(img.end, img.start + 3))]
    assert torch.equal(first, torch.sort(torch.cat([base, torch.tensor(want, dtype=torch.long)])).values)


def test_example_layout():
    # system text [0,10) is the matched prefix; text, a reused 8-token image, more text, a new image.
    layout = TokenLayout(seq_len=40, prefix_len=10, images=(ImageSpan(15, 8, True), ImageSpan(30, 4, False)))
    assert layout.base_tokens().tolist() == [*range(10, 15), *range(23, 40)]
    assert layout.reused_tokens().tolist() == list(range(15, 23))
    s = get_recompute_policy("first_k", PolicyParams(first_k=2)).plan(layout, 3)
    assert s[2].tolist() == [*range(10, 17), *range(23, 40)]


def test_first_k_counts_from_the_image_start_across_prefill_chunks():
    # A 20-token image split by a chunk boundary: tokens 0..11 in chunk 1, 12..19 in chunk 2.
    policy = get_recompute_policy("first_k", PolicyParams(first_k=16))
    chunk1 = TokenLayout(seq_len=32, prefix_len=0, images=(ImageSpan(20, 12, True),))
    chunk2 = TokenLayout(seq_len=48, prefix_len=32, images=(ImageSpan(32, 8, True, offset_in_image=12),))
    assert policy.plan(chunk1, 1)[0].tolist() == list(range(0, 32))  # all 12 image tokens are among the first 16
    assert policy.plan(chunk2, 1)[0].tolist() == [32, 33, 34, 35, *range(40, 48)]  # image tokens 12..15 only
    late = TokenLayout(seq_len=48, prefix_len=32, images=(ImageSpan(32, 8, True, offset_in_image=20),))
    assert policy.plan(late, 1)[0].tolist() == list(range(40, 48))


@pytest.mark.parametrize(
    "layout_args",
    [
        dict(seq_len=10, prefix_len=11),
        dict(seq_len=10, prefix_len=0, images=(ImageSpan(5, 6, True),)),  # past the end
        dict(seq_len=20, prefix_len=0, images=(ImageSpan(5, 6, True), ImageSpan(8, 2, True))),  # overlap
        dict(seq_len=20, prefix_len=6, images=(ImageSpan(5, 6, True),)),  # reused inside prefix
        dict(seq_len=20, prefix_len=0, images=(ImageSpan(5, 0, True),)),  # empty
    ],
)
def test_bad_layouts_are_rejected(layout_args):
    with pytest.raises(ValueError):
        TokenLayout(**layout_args)


def test_unknown_policy_names_the_registered_ones():
    with pytest.raises(ValueError, match="first_k"):
        get_recompute_policy("cache_blend_typo")
    assert set(STATIC_POLICIES) <= set(registered_recompute_policies())


def test_select_protocol_errors():
    layout = TokenLayout(seq_len=20, prefix_len=0, images=(ImageSpan(5, 6, True),))
    policy = get_recompute_policy("full")
    with pytest.raises(ValueError):
        policy.select(layout, 1, 4, previous=None)
    with pytest.raises(ValueError):
        policy.select(layout, 0, 4, previous=torch.arange(20))
    with pytest.raises(ValueError):
        policy.select(layout, 4, 4, previous=torch.arange(20))


class TopDeviation(RecomputePolicy):
    """A CacheBlend-shaped policy: keep the reused tokens whose K deviates most at this layer."""

    name = "test_top_deviation"
    needs_observation = True

    def budget(self, layout, layer, num_layers):
        return int(self.params.recompute_ratio * layout.reused_tokens().numel())

    def _choose(self, layout, layer, num_layers, candidates, observation: Optional[LayerObservation]):
        assert observation is not None and torch.equal(observation.tokens, candidates)
        k = min(self.budget(layout, layer, num_layers), candidates.numel())
        return candidates[torch.topk(observation.k_deviation, k).indices]


@given(layout=layouts(), num_layers=st.integers(1, 5), ratio=st.floats(0, 1), seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_interface_admits_a_deviation_driven_policy(layout, num_layers, ratio, seed):
    policy = TopDeviation(PolicyParams(recompute_ratio=ratio))
    with pytest.raises(ValueError):
        policy.plan(layout, num_layers)
    gen = torch.Generator().manual_seed(seed)
    reused = layout.reused_tokens()
    sets, previous = [], None
    for layer in range(num_layers):
        active = reused if previous is None else reused[torch.isin(reused, previous)]
        obs = LayerObservation(active, torch.rand(active.numel(), generator=gen))
        previous = policy.select(layout, layer, num_layers, previous, obs)
        sets.append(previous)
    _check_contract(policy, layout, sets)


def test_a_policy_that_breaks_nesting_is_caught():
    class Grows(RecomputePolicy):
        name = "test_grows"

        def budget(self, layout, layer, num_layers):
            return 10**9

        def _choose(self, layout, layer, num_layers, candidates, observation):
            return layout.reused_tokens()  # ignores candidates: re-adds dropped tokens

    layout = TokenLayout(seq_len=20, prefix_len=0, images=(ImageSpan(5, 6, True),))
    with pytest.raises(RuntimeError, match="nesting"):
        Grows().select(layout, 1, 2, previous=layout.base_tokens())
