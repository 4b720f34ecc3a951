"""Batched grid pixels equal the HF image processor's output for the same images as PNGs."""

import io

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor

from benchmarks.tiny_vlm.grid_task import GridSpec, png_bytes, random_grids, render
from benchmarks.tiny_vlm.pixels import grid_pixel_values, grid_thw, tokens_per_image


def test_pixel_values_equal_the_processor_on_pngs(tiny_dir, spec):
    proc = AutoImageProcessor.from_pretrained(tiny_dir)
    grids = random_grids(spec, 3, np.random.default_rng(0))
    images = [Image.open(io.BytesIO(png_bytes(render(g, spec)))) for g in grids]
    ref = proc(images=images, return_tensors="pt")
    ours = grid_pixel_values(torch.from_numpy(grids), spec, proc.image_mean, proc.image_std)
    assert ref["image_grid_thw"].tolist() == [list(grid_thw(spec))] * 3
    assert ours.shape == ref["pixel_values"].shape
    torch.testing.assert_close(ours, ref["pixel_values"].float(), atol=1e-5, rtol=0)


def test_one_token_per_cell_on_a_larger_grid(tiny_dir):
    spec = GridSpec(cells=8, colours=("red", "blue"), max_count=9)
    proc = AutoImageProcessor.from_pretrained(tiny_dir, max_pixels=spec.image_px ** 2)
    grid = random_grids(spec, 1, np.random.default_rng(1))
    ref = proc(images=[render(grid[0], spec)], return_tensors="pt")
    assert tokens_per_image(spec) == spec.cells ** 2 == int(ref["image_grid_thw"].prod()) // 4
    ours = grid_pixel_values(torch.from_numpy(grid), spec, proc.image_mean, proc.image_std)
    torch.testing.assert_close(ours, ref["pixel_values"].float(), atol=1e-5, rtol=0)
