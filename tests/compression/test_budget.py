"""VL-Cache layer budgets: the formula, its clip, the uniform baseline and kept counts (properties)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlcache_sglang.compression.budget import (MIN_BUDGET, kept_counts, layer_budgets, layer_sparsity,
                                               uniform_budgets, vlcache_budgets)

gammas = st.lists(st.floats(0.0, 0.999), min_size=1, max_size=40)
alphas = st.floats(0.01, 1.0)


def test_formula_on_a_worked_example():
    # L = 3, densities 0.5, 0.25, 0.25 (sum 1): beta = 0.1 * 3 * density / 1
    got = vlcache_budgets([0.5, 0.75, 0.75], alpha=0.1)
    torch.testing.assert_close(got, torch.tensor([0.15, 0.075, 0.075], dtype=torch.float64))


@given(gamma=gammas, alpha=alphas)
@settings(max_examples=200, deadline=None)
def test_budgets_are_clipped_and_follow_density(gamma, alpha):
    beta = vlcache_budgets(gamma, alpha)
    assert beta.shape == (len(gamma),)
    assert bool(((beta >= MIN_BUDGET) & (beta <= 1.0)).all())
    # Denser layers (lower gamma) never get less.
    order = sorted(range(len(gamma)), key=lambda l: gamma[l])
    assert all(beta[a] >= beta[b] - 1e-12 for a, b in zip(order, order[1:]))
    # Unclipped, the mean is alpha exactly.
    raw = alpha * len(gamma) * (1 - torch.tensor(gamma, dtype=torch.float64))
    raw = raw / (1 - torch.tensor(gamma, dtype=torch.float64)).sum()
    if bool(((raw >= MIN_BUDGET) & (raw <= 1.0)).all()):
        assert math.isclose(float(beta.mean()), alpha, rel_tol=1e-9)


@given(gamma=st.floats(0.0, 0.999), num_layers=st.integers(1, 40), alpha=alphas)
@settings(max_examples=100, deadline=None)
def test_equal_sparsity_is_the_uniform_baseline(gamma, num_layers, alpha):
    torch.testing.assert_close(vlcache_budgets([gamma] * num_layers, alpha), uniform_budgets(num_layers, alpha))


@given(gamma=gammas, alpha=st.floats(0.01, 0.3), cap=st.floats(0.3, 0.99))
@settings(max_examples=200, deadline=None)
def test_a_layer_cap_holds_every_layer_under_it_and_keeps_the_mean(gamma, alpha, cap):
    """beta_max (ours): no layer above the cap, denser layers still never get less, and the budget a
    capped layer loses goes to the others (mean alpha, up to the floor's rise)."""
    beta = vlcache_budgets(gamma, alpha, max_budget=cap)
    assert bool(((beta >= MIN_BUDGET) & (beta <= cap + 1e-12)).all())
    order = sorted(range(len(gamma)), key=lambda l: gamma[l])
    assert all(beta[a] >= beta[b] - 1e-12 for a, b in zip(order, order[1:]))
    assert float(beta.mean()) >= alpha - 1e-9 and float(beta.mean()) <= max(alpha, MIN_BUDGET) + MIN_BUDGET
    uncapped = vlcache_budgets(gamma, alpha)
    if float(uncapped.max()) <= cap:
        torch.testing.assert_close(beta, uncapped)


def test_the_cap_on_a_worked_example():
    # densities 0.9, 0.05, 0.05 at alpha 0.3: uncapped 0.81, 0.045, 0.045; capped at 0.4 the first
    # layer's excess is shared by the other two: 0.4, 0.25, 0.25 (mean 0.3)
    got = vlcache_budgets([0.1, 0.95, 0.95], alpha=0.3, max_budget=0.4)
    torch.testing.assert_close(got, torch.tensor([0.4, 0.25, 0.25], dtype=torch.float64))
    assert vlcache_budgets([0.1, 0.95, 0.95], alpha=0.3).tolist()[0] == pytest.approx(0.81)
    assert uniform_budgets(3, 0.5, max_budget=0.4).tolist() == [0.4, 0.4, 0.4]
    with pytest.raises(ValueError, match="max_budget"):
        vlcache_budgets([0.5], 0.1, max_budget=0.0)


@given(gamma=gammas, alpha=st.floats(0.02, 0.5), share=st.floats(0.0, 1.0))
@settings(max_examples=200, deadline=None)
def test_a_uniform_share_floors_every_layer_and_keeps_the_mean(gamma, alpha, share):
    """uniform_share s (ours): beta_l = s * alpha + (1 - s) * VL-Cache's beta_l where nothing clips, so
    every layer keeps at least s * alpha, the mean stays alpha, and the order by density is kept."""
    beta = vlcache_budgets(gamma, alpha, uniform_share=share)
    paper = vlcache_budgets(gamma, alpha)
    assert bool((beta >= min(share * alpha, 1.0) - 1e-12).all())
    order = sorted(range(len(gamma)), key=lambda l: gamma[l])
    assert all(beta[a] >= beta[b] - 1e-12 for a, b in zip(order, order[1:]))
    raw = share * alpha + (1 - share) * alpha * len(gamma) * (1 - torch.tensor(gamma, dtype=torch.float64)) / \
        (1 - torch.tensor(gamma, dtype=torch.float64)).sum()
    if bool(((raw >= MIN_BUDGET) & (raw <= 1.0)).all()):
        torch.testing.assert_close(beta, raw)
        assert math.isclose(float(beta.mean()), alpha, rel_tol=1e-9)
    if share == 0.0:
        torch.testing.assert_close(beta, paper)


def test_the_uniform_share_on_a_worked_example():
    # densities 0.5, 0.25, 0.25 at alpha 0.1: the paper's 0.15, 0.075, 0.075; half uniform:
    # 0.05 + 0.5 * (0.15, 0.075, 0.075) = 0.125, 0.0875, 0.0875 (mean 0.1); all uniform: 0.1 each
    got = vlcache_budgets([0.5, 0.75, 0.75], alpha=0.1, uniform_share=0.5)
    torch.testing.assert_close(got, torch.tensor([0.125, 0.0875, 0.0875], dtype=torch.float64))
    torch.testing.assert_close(vlcache_budgets([0.5, 0.75, 0.75], 0.1, uniform_share=1.0), uniform_budgets(3, 0.1))
    with pytest.raises(ValueError, match="uniform_share"):
        vlcache_budgets([0.5], 0.1, uniform_share=1.5)


def test_layer_budgets_names_the_servers_methods():
    gamma = [0.5, 0.75, 0.75]
    torch.testing.assert_close(layer_budgets("vlcache", gamma, 0.1, uniform_share=0.5),
                               vlcache_budgets(gamma, 0.1, uniform_share=0.5))
    torch.testing.assert_close(layer_budgets("uniform", gamma, 0.1, max_budget=0.05), uniform_budgets(3, 0.1, max_budget=0.05))
    with pytest.raises(ValueError, match="unknown"):
        layer_budgets("h2o", gamma, 0.1)


def test_alpha_one_keeps_everything_at_every_layer():
    assert vlcache_budgets([0.1, 0.9, 0.5, 0.0], 1.0).tolist() == [1.0, 1.0, 1.0, 1.0]
    assert kept_counts(vlcache_budgets([0.1, 0.9], 1.0), 37) == [37, 37]


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_bad_alpha_is_refused(bad):
    with pytest.raises(ValueError, match="alpha"):
        vlcache_budgets([0.5], bad)
    with pytest.raises(ValueError, match="alpha"):
        uniform_budgets(3, bad)


def test_bad_sparsity_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        vlcache_budgets([0.5, 1.2], 0.1)
    with pytest.raises(ValueError, match="at least one layer"):
        vlcache_budgets([], 0.1)


def test_all_sparse_falls_back_to_uniform():
    assert vlcache_budgets([1.0, 1.0], 0.3).tolist() == [0.3, 0.3]


@given(beta=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=30), m=st.integers(0, 5000),
       min_keep=st.integers(0, 100))
@settings(max_examples=200, deadline=None)
def test_kept_counts_properties(beta, m, min_keep):
    counts = kept_counts(beta, m, min_keep)
    for b, c in zip(beta, counts):
        assert min(min_keep, m) <= c <= m
        assert c == max(math.floor(b * m + 1e-9), min(min_keep, m))


def test_kept_counts_examples():
    assert kept_counts([0.1, 0.5, 1.0], 1000) == [100, 500, 1000]
    assert kept_counts([0.01], 1) == [0]  # floor(0.01): only the protected tokens survive
    assert kept_counts([0.01], 1, min_keep=4) == [1]
    assert kept_counts([0.07], 100) == [7]  # 0.07 * 100 = 7.000000000000001 or 6.99...: floor is 7


def test_layer_sparsity_averages_row_fractions():
    # Two queries at positions 1 and 3 (2 and 4 valid entries), two heads.
    counts = torch.tensor([[1, 0], [2, 4]])
    got = layer_sparsity(counts, torch.tensor([1, 3]))
    assert math.isclose(got, (1 / 2 + 0 / 2 + 2 / 4 + 4 / 4) / 4)


def test_layer_sparsity_contract():
    with pytest.raises(ValueError, match="tau"):
        layer_sparsity(torch.zeros(3, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="no post-vision"):
        layer_sparsity(torch.zeros(0, 2), torch.zeros(0))
