"""water_fill: capped proportional shares summing to the total."""

import pytest
import torch

from vlcache_sglang.water_fill import water_fill


def test_capped_shares_go_to_the_others_in_proportion():
    got = water_fill(torch.tensor([0.9, 0.05, 0.05], dtype=torch.float64), 0.9, 0.4)
    torch.testing.assert_close(got, torch.tensor([0.4, 0.25, 0.25], dtype=torch.float64))
    assert water_fill(torch.tensor([3.0, 1.0], dtype=torch.float64), 4.0, 1.0).tolist() == [1.0, 1.0], "all capped"


def test_zero_weights_share_what_the_others_cannot_take():
    got = water_fill(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), 1.5, 1.0)
    assert got.tolist() == pytest.approx([1.0, 0.25, 0.25])
    tiny = water_fill(torch.tensor([1.0, 2.2250738585072014e-308], dtype=torch.float64), 1.5, 1.0)
    assert tiny.tolist() == pytest.approx([1.0, 0.5]), "a subnormal share neither underflows nor overflows"
