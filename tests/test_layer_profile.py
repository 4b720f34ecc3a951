"""LayerProfile: file round trip, validation with a fix in the message, and the ratio contract."""

import json
import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vlcache_sglang.layer_profile import (LayerProfile, check_profile_matches, layer_ratios, load_layer_profile,
                                          save_layer_profile, step_ratios)

sensitivities = st.lists(st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_subnormal=False),
                         min_size=1, max_size=40)
ratios = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


# ----- the ratio contract -----------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(sensitivities, ratios)
@example([8.0, 2.2250738585072014e-308], 0.75)  # a weight that underflows to a subnormal once scaled
def test_ratios_are_non_increasing_in_unit_interval_with_the_requested_mean(sens, mean):
    r = layer_ratios(LayerProfile(tuple(sens), "first_token_kl"), mean)
    assert len(r) == len(sens)
    assert all(0.0 <= x <= 1.0 for x in r)
    assert all(a >= b for a, b in zip(r, r[1:])), r  # nested sets S_{l+1} ⊆ S_l
    # Always achievable: the constant mean_ratio is one feasible answer.
    assert math.isclose(sum(r) / len(r), mean, rel_tol=1e-9, abs_tol=1e-12), (r, mean)


@settings(max_examples=200, deadline=None)
@given(sensitivities, ratios, st.integers(min_value=1, max_value=6))
def test_step_ratios_keep_the_sum_and_nesting_with_at_most_the_levels_asked(sens, mean, levels):
    r = layer_ratios(LayerProfile(tuple(sens), "first_token_kl"), mean)
    q = step_ratios(r, levels)
    assert len(q) == len(r) and len(set(q)) <= max(levels, 1)
    assert all(a >= b - 1e-12 for a, b in zip(q, q[1:])), q  # still nested
    assert math.isclose(sum(q), sum(r), rel_tol=1e-9, abs_tol=1e-12), "the same compute"
    assert all(0.0 <= x <= 1.0 + 1e-12 for x in q)


def test_step_ratios_cut_where_the_profile_drops_and_leave_few_levels_alone():
    assert step_ratios([1.0, 0.9, 0.2, 0.1], 2) == pytest.approx((0.95, 0.95, 0.15, 0.15))
    # 1/l over 28 layers (the synthetic 7B profile): four runs, front-loaded, each at its mean
    r = layer_ratios(LayerProfile((0.0,) + tuple(1 / l for l in range(1, 28)), "synthetic"), 0.05)
    q = step_ratios(r, 4)
    assert len(set(q)) == 4 and q[0] == pytest.approx(r[0]) and q[-1] < 0.05 < q[0]
    steps = (0.5, 0.5, 0.2, 0.1)
    assert step_ratios(steps, 3) == steps and step_ratios(steps, 0) == steps  # nothing to merge / off
    with pytest.raises(ValueError, match="non-increasing"):
        step_ratios([0.1, 0.2], 1)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 64), ratios, st.floats(min_value=1e-6, max_value=1e6))
def test_uniform_or_zero_profile_gives_the_mean_everywhere(n, mean, value):
    assert layer_ratios(LayerProfile.uniform(n), mean) == (mean,) * n
    assert layer_ratios(LayerProfile((value,) * n, "kl"), mean) == (mean,) * n
    assert layer_ratios(LayerProfile((0.0,) * n, "kl"), mean) == (mean,) * n


@settings(max_examples=100, deadline=None)
@given(sensitivities)
def test_ratio_zero_and_one(sens):
    p = LayerProfile(tuple(sens), "kl")
    assert layer_ratios(p, 0.0) == (0.0,) * len(sens)
    assert layer_ratios(p, 1.0) == (1.0,) * len(sens)


@settings(max_examples=200, deadline=None)
@given(sensitivities, st.floats(min_value=0.0, max_value=0.2))
def test_without_clipping_ratios_follow_the_suffix_max(sens, mean):
    r = layer_ratios(LayerProfile(tuple(sens), "kl"), mean)
    suffix = [max(sens[i:]) for i in range(len(sens))]
    if max(r) < 1.0 and suffix[0] > 0:
        scale = r[0] / suffix[0]
        for x, w in zip(r, suffix):
            assert math.isclose(x, scale * w, rel_tol=1e-9, abs_tol=1e-12)


def test_a_worked_example():
    # Layer 2 is the most sensitive: layers 0..2 share its weight, layer 3 keeps its own.
    r = layer_ratios(LayerProfile((0.0, 1.0, 4.0, 2.0), "kl"), 0.25)
    assert r == pytest.approx((2 / 7, 2 / 7, 2 / 7, 1 / 7))
    # Clipping: 3 layers would exceed 1; the excess goes to the last layer.
    r = layer_ratios(LayerProfile((4.0, 4.0, 4.0, 1.0), "kl"), 0.9)
    assert r == pytest.approx((1.0, 1.0, 1.0, 0.6))
    # A zero tail takes what is left once every sensitive layer is at 1.
    r = layer_ratios(LayerProfile((1.0, 1.0, 0.0, 0.0), "kl"), 0.75)
    assert r == pytest.approx((1.0, 1.0, 0.5, 0.5))


@pytest.mark.parametrize("bad", [-0.01, 1.5, float("nan")])
def test_ratio_out_of_range_is_an_error(bad):
    with pytest.raises(ValueError, match="mean_ratio"):
        layer_ratios(LayerProfile.uniform(3), bad)


# ----- the dataclass ----------------------------------------------------------------------------

@pytest.mark.parametrize("sens", [(), (1.0, -1.0), (float("inf"),), (float("nan"), 1.0)])
def test_invalid_sensitivities_are_refused(sens):
    with pytest.raises(ValueError, match="sensitivit"):
        LayerProfile(sens, "kl")


def test_uniform_and_num_layers():
    p = LayerProfile.uniform(28)
    assert p.num_layers == 28 and set(p.sensitivity) == {1.0} and p.metric == "uniform"
    assert LayerProfile([1, 2], "kl").sensitivity == (1.0, 2.0)  # a list becomes a tuple of floats
    with pytest.raises(ValueError, match="num_layers"):
        LayerProfile.uniform(0)


def test_a_profile_of_another_model_is_rejected_with_the_fix():
    p = LayerProfile((0.0, 1.0, 0.5), "first_token_kl", model="/ckpt/tiny")
    check_profile_matches(p, 3)
    with pytest.raises(ValueError, match=r"3 layers.*expected 28.*rerun .*vlcache_sglang\.calibrate --model /m/7B"):
        check_profile_matches(p, 28, model="/m/7B")


# ----- the file ---------------------------------------------------------------------------------

def test_round_trip(tmp_path):
    p = LayerProfile((0.0, 0.125, 3.5e-4), "first_token_kl", model="/ckpt", samples=7)
    path = tmp_path / "sub" / "profile.json"
    save_layer_profile(p, path)
    assert load_layer_profile(path) == p
    doc = json.loads(path.read_text())
    assert doc == {"format": "vlcache-layer-profile", "version": 1, "metric": "first_token_kl", "model": "/ckpt",
                   "samples": 7, "num_hidden_layers": 3, "sensitivity": [0.0, 0.125, 3.5e-4]}
    assert [f.name for f in path.parent.iterdir()] == ["profile.json"]  # no temporary left behind


def _doc(**changes):
    doc = {"format": "vlcache-layer-profile", "version": 1, "metric": "first_token_kl", "model": "m",
           "samples": 2, "num_hidden_layers": 2, "sensitivity": [0.0, 1.0]}
    doc.update(changes)
    return doc


@pytest.mark.parametrize("content, match", [
    ("not json", "expected JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps(_doc(format="other")), "format"),
    (json.dumps(_doc(version=2)), "version"),
    (json.dumps(_doc(sensitivity=[])), "sensitivity"),
    (json.dumps(_doc(sensitivity=[0.0, "x"])), "sensitivity"),
    (json.dumps(_doc(sensitivity=[0.0, -1.0])), ">= 0"),
    ('{"format": "vlcache-layer-profile", "version": 1, "metric": "kl", "num_hidden_layers": 1, '
     '"sensitivity": [NaN]}', "finite"),
    (json.dumps(_doc(num_hidden_layers=3)), "num_hidden_layers"),
    (json.dumps(_doc(metric="")), "metric"),
    (json.dumps(_doc(samples=-1)), "samples"),
])
def test_bad_files_say_expected_got_and_fix(tmp_path, content, match):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as err:
        load_layer_profile(path)
    assert "expected" in str(err.value) and "got" in str(err.value) and "fix:" in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_layer_profile(tmp_path / "absent.json")
