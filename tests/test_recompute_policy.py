import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlcache_sglang.layer_selector import LayerSelector
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


def _observation(tokens: torch.Tensor, k_dev: torch.Tensor, v_dev=None) -> LayerObservation:
    """Fresh K/V of ones; cached K/V off by the given per-token L2 deviations (one dimension)."""
    n = tokens.numel()
    fresh = torch.ones(n, 4)
    k_cached, v_cached = fresh.clone(), fresh.clone()
    k_cached[:, 0] += k_dev
    v_cached[:, 0] += k_dev if v_dev is None else v_dev
    return LayerObservation(tokens, fresh, k_cached, fresh.clone(), v_cached)


def drive(policy: RecomputePolicy, layout: TokenLayout, num_layers: int, deviation) -> LayerSelector:
    """Run the decoder loop's protocol: deviation(tokens) -> per-token K deviation where it observes."""
    sel = LayerSelector(policy, layout, num_layers)
    for layer in range(num_layers):
        if not sel.ready(layer):
            tokens = sel.candidates(layer)
            sel.observe(layer, _observation(tokens, deviation(tokens)))
    return sel


ALL_POLICIES = [*STATIC_POLICIES, "vlcache", "cacheblend", "error_bounded", "image_bounded"]


@pytest.mark.parametrize("name", ALL_POLICIES)
@given(layout=layouts(), num_layers=st.integers(1, 5), ratio=st.floats(0, 1), seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_every_policy_keeps_the_contract_through_the_selector(name, layout, num_layers, ratio, seed):
    gen = torch.Generator().manual_seed(seed)
    policy = get_recompute_policy(name, PolicyParams(recompute_ratio=ratio, error_bound=0.5))
    sel = drive(policy, layout, num_layers, lambda t: torch.rand(t.numel(), generator=gen))
    assert all(sel.ready(layer) for layer in range(num_layers))
    _check_contract(policy, layout, sel.sets)
    out = sel.outcome()
    assert out.reused_tokens == layout.reused_tokens().numel()
    assert 0 <= out.computed_token_layers <= out.reused_tokens * num_layers


def test_cacheblend_keeps_the_top_deviating_tokens_from_the_check_layer_on():
    layout = TokenLayout(seq_len=30, prefix_len=0, images=(ImageSpan(5, 20, reused=True),))
    policy = get_recompute_policy("cacheblend", PolicyParams(recompute_ratio=0.15, check_layer=1))
    assert [policy.observes_at(layer) for layer in range(4)] == [False, True, False, False]
    dev = torch.zeros(30)
    dev[[7, 12, 20]] = torch.tensor([3.0, 5.0, 4.0])
    sel = drive(policy, layout, 4, lambda t: dev[t])
    base = layout.base_tokens().tolist()
    assert sel.sets[0].tolist() == list(range(30)), "layer 0 (before the check layer) computes everything"
    assert sel.sets[1].tolist() == sorted(base + [7, 12, 20]) == sel.sets[3].tolist()
    out = sel.outcome()  # layers 0 and 1 computed QKV of all 20 reused tokens, layers 2-3 of 3
    assert out.computed_token_layers == 20 + 20 + 3 + 3 and out.recomputed_last_layer == 3


def test_cacheblend_can_rank_by_v():
    layout = TokenLayout(seq_len=10, prefix_len=0, images=(ImageSpan(0, 10, reused=True),))
    policy = get_recompute_policy("cacheblend", PolicyParams(recompute_ratio=0.1, blend_score="v"))
    sel = LayerSelector(policy, layout, 3)
    tokens = sel.candidates(1)
    k_dev, v_dev = torch.zeros(10), torch.zeros(10)
    k_dev[2], v_dev[6] = 9.0, 1.0
    sel.observe(1, _observation(tokens, k_dev, v_dev))
    assert sel.sets[2].tolist() == [6], "ranked by V, not by K"


def test_error_bounded_recomputes_what_deviates_beyond_the_bound_plus_the_floor():
    # Two reused 10-token images; fresh K/V are ones (norm 2 over 4 dims), so deviation d is relative d/2.
    layout = TokenLayout(seq_len=24, prefix_len=0, images=(ImageSpan(2, 10, True), ImageSpan(12, 10, True)))
    policy = get_recompute_policy("error_bounded", PolicyParams(recompute_ratio=0.1, error_bound=0.25))
    dev = torch.zeros(24)
    dev[[5, 6]] = 0.6  # relative 0.3 > 0.25
    dev[15] = 0.4  # relative 0.2: within the bound
    sel = drive(policy, layout, 3, lambda t: dev[t])
    reused = set(layout.reused_tokens().tolist())
    kept = [t for t in sel.sets[2].tolist() if t in reused]
    assert kept == [2, 5, 6, 12], "each image's first token (floor 10 %) and the two beyond the bound"
    everything = drive(policy, layout, 3, lambda t: torch.ones(t.numel()))
    assert everything.sets[2].tolist() == list(range(24)), "a context that differs everywhere: all recomputed"


def test_image_bounded_recomputes_a_widely_deviating_image_whole():
    # Fresh K/V are ones (norm 2 over 4 dims): deviation d is relative d / 2, per token and per image.
    layout = TokenLayout(seq_len=34, prefix_len=0,
                         images=(ImageSpan(2, 10, True), ImageSpan(12, 10, False), ImageSpan(22, 10, True)))
    params = PolicyParams(recompute_ratio=0.1, error_bound=0.25)
    dev = torch.zeros(34)
    dev[2:12] = 0.4  # image 1: every token relative 0.2, within the bound alone; the image as a whole 0.2
    dev[22:32] = 0.4
    dev[[24, 25, 26, 27, 28, 29]] = 0.7  # image 3: six tokens at 0.35, the image sqrt(0.6*0.35²+0.4*0.2²) ≈ 0.30
    reused = set(layout.reused_tokens().tolist())

    def kept(name: str) -> list[int]:
        sel = drive(get_recompute_policy(name, params), layout, 3, lambda t: dev[t])
        return [t for t in sel.sets[2].tolist() if t in reused]

    assert kept("error_bounded") == [2, 22, 24, 25, 26, 27, 28, 29], "token by token: floor + the six"
    assert kept("image_bounded") == [2] + list(range(22, 32)), "image 3 beyond the bound as a whole: all of it"


def test_image_error_is_taken_over_all_ranks_heads():
    tokens = torch.arange(6)
    fresh = torch.ones(6, 4)
    cached = fresh.clone()
    cached[:3, :2] += 1.0  # group 0: rank 0's half moved, rank 1's did not
    whole = LayerObservation(tokens, fresh, cached, fresh, fresh)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    expect = whole.group_relative_error(groups, 2)
    assert expect[1] == 0 and expect[0] == pytest.approx((2 / 4) ** 0.5)
    halves = (slice(0, 2), slice(2, 4))

    def rank_error(r: int, sum_ranks) -> list[float]:
        obs = LayerObservation(tokens, fresh[:, halves[r]], cached[:, halves[r]], fresh[:, halves[r]],
                               fresh[:, halves[r]], sum_ranks=sum_ranks)
        return obs.group_relative_error(groups, 2).tolist()

    per_rank = _two_ranks(rank_error)
    assert per_rank[0] == per_rank[1] == pytest.approx(expect.tolist())


def test_vlcache_follows_its_layer_ratios_by_whole_image_size():
    layout = TokenLayout(seq_len=50, prefix_len=0, images=(ImageSpan(10, 40, True),))
    policy = get_recompute_policy("vlcache", PolicyParams(layer_ratios=(0.5, 0.25, 0.01, 0.0)))
    sets = policy.plan(layout, 4)
    heads = [[t for t in s.tolist() if t >= 10] for s in sets]
    assert heads == [list(range(10, 30)), list(range(10, 20)), [10], []], "max(1, floor(r N)) leading tokens"
    uniform = get_recompute_policy("vlcache", PolicyParams(recompute_ratio=0.1))
    planned = uniform.plan(layout, 3)
    assert planned[1] is planned[0] and planned[2] is planned[0], "uniform: one set shared by every layer"
    first_k = get_recompute_policy("first_k", PolicyParams(first_k=4))
    assert torch.equal(uniform.plan(layout, 2)[1], first_k.plan(layout, 2)[1]), "uniform = first_k at k = r N"
    # A chunk holding the image's tail [25, 40): the head is still sized from the whole image (40 tokens).
    tail = TokenLayout(seq_len=50, prefix_len=25, images=(ImageSpan(25, 15, True, offset_in_image=15, image_tokens=40),))
    assert [t for t in policy.plan(tail, 4)[0].tolist() if t < 40] == list(range(25, 30))


@given(layout=layouts(), steps=st.lists(st.floats(0, 1), min_size=1, max_size=4), reps=st.integers(1, 4))
@settings(max_examples=60, deadline=None)
def test_a_stepped_vlcache_plan_selects_once_per_step_and_as_every_layer_would(layout, steps, reps):
    """plan() shares a step's set across its layers: the same sets as a select per layer, one select
    per run of equal ratios (what a request's planning costs the scheduler)."""
    ratios = tuple(r for r in sorted(steps, reverse=True) for _ in range(reps))
    policy = get_recompute_policy("vlcache", PolicyParams(layer_ratios=ratios))
    per_layer, previous = [], None
    for layer in range(len(ratios)):
        previous = policy.select(layout, layer, len(ratios), previous)
        per_layer.append(previous)
    calls = []
    select = policy.select
    policy.select = lambda *a, **k: calls.append(a[1]) or select(*a, **k)
    sets = policy.plan(layout, len(ratios))
    assert all(torch.equal(a, b) for a, b in zip(sets, per_layer))
    runs = 1 + sum(b != a for a, b in zip(ratios, ratios[1:]))
    assert len(calls) == runs  # a uniform profile is one run: one select
    _check_contract(policy, layout, sets)


def test_params_reject_what_no_policy_can_serve():
    with pytest.raises(ValueError, match="non-increasing"):
        PolicyParams(layer_ratios=(0.1, 0.2))
    with pytest.raises(ValueError, match="layer-0"):
        PolicyParams(check_layer=0)
    with pytest.raises(ValueError, match="blend_score"):
        PolicyParams(blend_score="q")
    for share in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="check_sample"):
            PolicyParams(check_sample=share)


def test_selector_protocol_errors():
    layout = TokenLayout(seq_len=20, prefix_len=0, images=(ImageSpan(5, 6, True),))
    sel = LayerSelector(get_recompute_policy("cacheblend"), layout, 3)
    assert sel.ready(0) and not sel.ready(1) and not sel.layer_invariant
    with pytest.raises(ValueError, match="never decided"):
        sel.outcome()
    with pytest.raises(ValueError, match="not awaiting"):
        sel.observe(2, _observation(sel.candidates(1), torch.zeros(6)))
    with pytest.raises(ValueError, match="exactly the reused tokens"):
        sel.observe(1, _observation(sel.candidates(1)[:2], torch.zeros(2)))
    static = LayerSelector(get_recompute_policy("first_k", PolicyParams(first_k=2)), layout, 3)
    assert static.layer_invariant and static.changed == [True, False, False]
    assert static.outcome().computed_token_layers == 6
    with pytest.raises(ValueError, match="decided at every layer"):
        sel.charge_first_set()


def test_a_shrinking_plan_run_in_a_graph_is_charged_its_first_set_at_every_layer():
    """The graph path computes S_0 at every layer (writing only S_l's K/V): cost |S_0| x L, the same
    sets, the same tokens no layer computes."""
    layout = TokenLayout(seq_len=50, prefix_len=0, images=(ImageSpan(10, 40, True),))
    policy = get_recompute_policy("vlcache", PolicyParams(layer_ratios=(0.5, 0.25, 0.01, 0.0)))
    sel = LayerSelector(policy, layout, 4)
    eager = sel.outcome()
    assert eager.computed_token_layers == 20 + 10 + 1 + 0
    sel.charge_first_set()
    graph = sel.outcome()
    assert graph.computed_token_layers == 20 * 4 and graph.recomputed_fraction == pytest.approx(0.5)
    assert graph.recomputed_last_layer == eager.recomputed_last_layer == 0 and graph.reused_tokens == 40


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


@pytest.mark.parametrize("name, params", [("cacheblend", PolicyParams(recompute_ratio=0.3)),
                                          ("error_bounded", PolicyParams(recompute_ratio=0.05, error_bound=0.6)),
                                          ("image_bounded", PolicyParams(recompute_ratio=0.05, error_bound=0.6)),
                                          ("image_bounded", PolicyParams(recompute_ratio=0.05, error_bound=0.6,
                                                                         check_sample=0.5))],
                         ids=["cacheblend", "error_bounded", "image_bounded", "image_bounded-probe"])
def test_tensor_parallel_ranks_select_alike_from_their_own_heads(name, params):
    """A simulated TP=2 split of the KV heads: each rank observes only its heads; with the per-token
    squares summed across ranks (`sum_ranks`, an all-reduce in the server) both ranks select (a probe:
    replan) what one GPU holding every head selects. Without the sum they diverge (the check can fail)."""
    layout = TokenLayout(seq_len=60, prefix_len=0, images=(ImageSpan(4, 48, True),))
    policy = get_recompute_policy(name, params)
    gen = torch.Generator().manual_seed(7)
    n, heads, d = 48, 4, 8
    fresh_k, fresh_v = torch.randn(n, heads * d, generator=gen), torch.randn(n, heads * d, generator=gen)
    # Deviations that differ by head: head 0-1 (rank 0) and 2-3 (rank 1) disagree on which tokens moved.
    scale = torch.rand(n, heads, 1, generator=gen).repeat(1, 1, d).reshape(n, heads * d) ** 3
    cached_k = fresh_k + scale * torch.randn(n, heads * d, generator=gen)
    cached_v = fresh_v + scale * torch.randn(n, heads * d, generator=gen)
    half = heads * d // 2

    def run(cols: slice, sum_ranks) -> list[int]:
        sel = LayerSelector(policy, layout, 4)
        tokens = sel.candidates(1)  # every reused token, or a probe's sample
        rows = tokens - 4
        sel.observe(1, LayerObservation(tokens, fresh_k[rows][:, cols], cached_k[rows][:, cols],
                                        fresh_v[rows][:, cols], cached_v[rows][:, cols], sum_ranks=sum_ranks))
        return sel.sets[3].tolist()

    one_gpu = run(slice(None), lambda t: t)
    ranks = (slice(0, half), slice(half, None))
    summed = _two_ranks(lambda r, sum_ranks: run(ranks[r], sum_ranks))
    assert summed[0] == summed[1] == one_gpu
    alone = [run(ranks[r], lambda t: t) for r in (0, 1)]
    assert alone[0] != alone[1], "each rank alone would select other tokens: the sum is what aligns them"


def _two_ranks(body):
    """body(rank, sum_ranks) on two threads, sum_ranks a collective as NCCL's all-reduce is: every rank
    hands in its tensor, waits for the other, and gets the sum of both."""
    import threading

    barrier, slots, out = threading.Barrier(2), [None, None], [None, None]

    def sum_ranks_of(rank: int):
        def sum_ranks(t: torch.Tensor) -> torch.Tensor:
            slots[rank] = t
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()  # both have read the slots before either writes the next call's
            return total
        return sum_ranks

    def run(rank: int) -> None:
        out[rank] = body(rank, sum_ranks_of(rank))

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return out


# ---- a probe: the check measures a sample, its decision replans every layer ------------------------

PROBE_LAYOUT = TokenLayout(seq_len=34, prefix_len=0,
                           images=(ImageSpan(2, 10, True), ImageSpan(12, 10, False), ImageSpan(22, 10, True)))


def _probe(name: str, bound: float, share: float = 0.25) -> RecomputePolicy:
    return get_recompute_policy(name, PolicyParams(recompute_ratio=0.1, error_bound=bound, check_sample=share))


def test_a_probe_computes_the_floor_and_a_strided_sample_up_to_its_check_layer():
    policy = _probe("image_bounded", 0.25)
    assert policy.probes and not get_recompute_policy("image_bounded").probes
    sel = LayerSelector(policy, PROBE_LAYOUT, 3)
    assert sel.probing and sel.ready(0) and not sel.ready(1)
    # floor: each image's first token (10 % of 10); sample: every 4th token from the image's start
    assert sel.candidates(1).tolist() == [2, 6, 10, 22, 26, 30]
    assert torch.isin(PROBE_LAYOUT.base_tokens(), sel.sets[0]).all()


def test_image_bounded_probe_replans_an_image_beyond_the_bound_whole_from_layer_0():
    dev = torch.zeros(34)
    dev[[22, 26, 30]] = 0.7  # image 3's sampled tokens at relative 0.35 > 0.25; image 1 exact
    sel = drive(_probe("image_bounded", 0.25), PROBE_LAYOUT, 3, lambda t: dev[t])
    assert sel.replanned and not sel.probing and sel.layer_invariant
    reused = set(PROBE_LAYOUT.reused_tokens().tolist())
    kept = [t for t in sel.sets[0].tolist() if t in reused]
    assert kept == [2] + list(range(22, 32)), "image 1's floor; image 3 whole, its unsampled tokens too"
    assert all(s is sel.sets[0] for s in sel.sets), "one static plan from layer 0"
    # the probe: 6 sampled tokens at layer 0 and their QKV at the check layer; then 11 at each of 3 layers
    assert sel.outcome().computed_token_layers == 6 + 6 + 11 * 3
    assert sel.outcome().computed_tokens == 13, "computed at some layer: the sample (2, 6, 10) and image 3"


def test_error_bounded_probe_bounds_only_the_sampled_tokens():
    dev = torch.zeros(34)
    dev[[26, 27]] = 0.7  # 26 is sampled, 27 is not: nobody measured it
    sel = drive(_probe("error_bounded", 0.25), PROBE_LAYOUT, 3, lambda t: dev[t])
    reused = set(PROBE_LAYOUT.reused_tokens().tolist())
    assert [t for t in sel.sets[2].tolist() if t in reused] == [2, 22, 26]


def test_a_probe_of_every_token_is_the_plain_check():
    """check_sample 1 is no probe: the same sets as the policy without it."""
    dev = torch.rand(34, generator=torch.Generator().manual_seed(3))
    plain = drive(get_recompute_policy("image_bounded", PolicyParams(recompute_ratio=0.1, error_bound=0.25)),
                  PROBE_LAYOUT, 3, lambda t: dev[t])
    whole = drive(_probe("image_bounded", 0.25, share=1.0), PROBE_LAYOUT, 3, lambda t: dev[t])
    assert not whole.replanned and all(torch.equal(a, b) for a, b in zip(plain.sets, whole.sets))


@pytest.mark.parametrize("name", ["error_bounded", "image_bounded"])
@given(layout=layouts(), num_layers=st.integers(2, 5), share=st.floats(0.05, 0.99), seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_probing_policies_keep_the_contract_through_the_selector(name, layout, num_layers, share, seed):
    gen = torch.Generator().manual_seed(seed)
    policy = get_recompute_policy(name, PolicyParams(recompute_ratio=0.05, error_bound=0.5, check_sample=share))
    sel = drive(policy, layout, num_layers, lambda t: torch.rand(t.numel(), generator=gen))
    assert all(sel.ready(layer) for layer in range(num_layers))
    _check_contract(policy, layout, sel.sets)
    assert sel.replanned == bool(layout.reused_images)
    n = layout.reused_tokens().numel()
    assert 0 <= sel.outcome().computed_token_layers <= n * (num_layers + 2), "plan plus the probe's two layers"


@pytest.mark.parametrize("name", ["cacheblend", "error_bounded", "image_bounded"])
@given(layout=layouts(), num_layers=st.integers(2, 6), seed=st.integers(0, 2**16))
@settings(max_examples=30, deadline=None)
def test_a_check_layer_policy_selects_at_layer_0_and_its_check_layer_only(name, layout, num_layers, seed):
    """Every other layer repeats its predecessor's set (the selects it skips cost host time inside
    the forward, after the observation): the same sets as a select at every layer."""
    policy = get_recompute_policy(name, PolicyParams(recompute_ratio=0.2, error_bound=0.5))
    deviation = lambda t: torch.rand(t.numel(), generator=torch.Generator().manual_seed(seed))  # noqa: E731
    calls = []
    select = policy.select
    policy.select = lambda *a, **k: calls.append(a[1]) or select(*a, **k)
    fast = drive(policy, layout, num_layers, deviation)
    assert calls == [0, 1]
    policy.repeats_previous = lambda layer, n: False  # a select at every layer, as before
    slow = drive(policy, layout, num_layers, deviation)
    assert all(torch.equal(a, b) for a, b in zip(fast.sets, slow.sets))
    assert fast.outcome() == slow.outcome()
