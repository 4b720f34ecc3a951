"""The batched window attention gives the vision tower's default output."""

import copy

import numpy as np
import pytest
import torch

from benchmarks.tiny_vlm.grid_task import GridSpec, random_grids
from benchmarks.tiny_vlm.pixels import grid_pixel_values, grid_thw
from benchmarks.tiny_vlm.vision_attention import use_windowed_sdpa

MEAN, STD = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]


@pytest.mark.parametrize("cells", [4, 6, 8])  # one window; unequal windows (4+2 tokens); 2x2 equal windows
def test_windowed_sdpa_equals_default(tiny_model, cells):
    spec = GridSpec(cells=cells, colours=("red", "blue"), max_count=3)
    grids = torch.from_numpy(random_grids(spec, 3, np.random.default_rng(cells)))
    pixels = grid_pixel_values(grids, spec, MEAN, STD)
    thw = torch.tensor([grid_thw(spec)] * 3)
    with torch.no_grad():
        ref = tiny_model.model.visual(pixels, grid_thw=thw).pooler_output
        model = copy.deepcopy(tiny_model)
        use_windowed_sdpa(model)
        ours = model.model.visual(pixels, grid_thw=thw).pooler_output
    assert ours.shape == (3 * cells * cells, tiny_model.config.text_config.hidden_size)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
