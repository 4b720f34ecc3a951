"""Grid images straight to the vision tower's `pixel_values`, batched on any device.

Training makes fresh images every step; running PIL + the HF image processor per image would cost more
than the model step. This reproduces what Qwen2VLImageProcessor does to a rendered grid (no resize:
sides are multiples of 28; rescale, normalise, 14-px patches in 2x2 merge order, frame repeated for the
temporal patch); the tests hold it equal to the processor on PNGs.
"""

from __future__ import annotations

import torch

from benchmarks.tiny_vlm.grid_task import RGB, GridSpec

PATCH = 14
MERGE = 2
TEMPORAL = 2


def grid_thw(spec: GridSpec) -> tuple[int, int, int]:
    """(t, h, w) in 14-px patches, as the processor reports it."""
    side = spec.image_px // PATCH
    return 1, side, side


def tokens_per_image(spec: GridSpec) -> int:
    _, h, w = grid_thw(spec)
    return h * w // MERGE ** 2


def grid_pixel_values(grids: torch.Tensor, spec: GridSpec, image_mean: list[float],
                      image_std: list[float]) -> torch.Tensor:
    """grids: [n, cells, cells] palette indices (long) -> [n * h * w, 3 * 2 * 14 * 14] float32,
    images concatenated in order (what the model takes with image_grid_thw = n x grid_thw(spec))."""
    if grids.ndim != 3 or grids.shape[1:] != (spec.cells, spec.cells):
        raise ValueError(f"grids must be [n, {spec.cells}, {spec.cells}], got {tuple(grids.shape)}")
    dev = grids.device
    lut = torch.tensor([RGB[c] for c in spec.palette], dtype=torch.float32, device=dev)
    mean = torch.tensor(image_mean, device=dev) * 255.0
    std = torch.tensor(image_std, device=dev) * 255.0
    # Normalising the palette first is the same per-pixel arithmetic as normalising the image.
    lut = (lut - mean) / std
    img = lut[grids]                                                   # [n, cells, cells, 3]
    img = img.repeat_interleave(spec.cell_px, 1).repeat_interleave(spec.cell_px, 2)
    img = img.permute(0, 3, 1, 2)                                      # [n, 3, H, W]
    n, c, hp, wp = img.shape
    gh, gw = hp // PATCH, wp // PATCH
    x = img.reshape(n, c, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)          # [n, gh/2, gw/2, 2, 2, c, 14, 14]
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, TEMPORAL, -1, -1)
    return x.reshape(n * gh * gw, c * TEMPORAL * PATCH * PATCH)
