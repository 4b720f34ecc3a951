"""The synthetic visual task: a grid of coloured cells and questions whose answer depends on the image
AND on the question, which the prompt puts BEFORE the image.

Each cell is `cell_px` = 28 px square, so with 14-px patches merged 2x2 every cell is exactly one image
token. Object colours appear 0..max_count times each on a white background, so a count is one digit.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

from benchmarks.tiny_vlm.prompts import FAVOURITE_QUESTION

# Names are single Qwen2 tokens with and without a leading space (checked by the tests).
RGB: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255), "red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220),
    "yellow": (240, 210, 40), "purple": (140, 50, 170), "orange": (245, 130, 20), "black": (20, 20, 20),
}
BACKGROUND = "white"
KINDS = ("count", "cell", "most", "row", "counts", "present")  # random_question's kinds; `ref` and `total` need more context


@dataclasses.dataclass(frozen=True)
class GridSpec:
    """Image layout: `cells` x `cells` cells of `cell_px` px, object colours each 0..max_count times."""

    cells: int = 8
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow")
    max_count: int = 5
    cell_px: int = 28

    def __post_init__(self) -> None:
        unknown = [c for c in (*self.colours, BACKGROUND) if c not in RGB]
        if unknown:
            raise ValueError(f"unknown colours {unknown}; choose from {list(RGB)}")
        if BACKGROUND in self.colours:
            raise ValueError(f"{BACKGROUND} is the background, not an object colour")
        if len(self.colours) * self.max_count > self.cells ** 2:
            raise ValueError(f"{len(self.colours)} colours x {self.max_count} cells do not fit a "
                             f"{self.cells}x{self.cells} grid; lower max_count")
        if self.max_count > 9:
            raise ValueError(f"max_count {self.max_count} > 9: answers must stay one digit")
        if self.cell_px % 28:
            raise ValueError(f"cell_px {self.cell_px} must be a multiple of 28 (one merged image token)")

    @property
    def image_px(self) -> int:
        return self.cells * self.cell_px

    @property
    def palette(self) -> tuple[str, ...]:
        """Index 0 is the background; cell arrays hold indices into this."""
        return (BACKGROUND, *self.colours)


@dataclasses.dataclass(frozen=True)
class Question:
    kind: str
    text: str
    answer: str


def random_grids(spec: GridSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    """[n, cells, cells] palette indices: colour k (1-based) on exactly counts[k] random cells."""
    cells = spec.cells ** 2
    counts = rng.integers(0, spec.max_count + 1, size=(n, len(spec.colours)))
    grids = np.zeros((n, cells), dtype=np.int64)
    order = rng.permuted(np.tile(np.arange(cells), (n, 1)), axis=1)
    for i in range(n):
        start = 0
        for k, c in enumerate(counts[i], start=1):
            grids[i, order[i, start:start + c]] = k
            start += c
    return grids.reshape(n, spec.cells, spec.cells)


def render(grid: np.ndarray, spec: GridSpec) -> Image.Image:
    """The grid as an RGB image, each cell a uniform square."""
    lut = np.array([RGB[c] for c in spec.palette], dtype=np.uint8)
    pixels = lut[grid].repeat(spec.cell_px, axis=0).repeat(spec.cell_px, axis=1)
    return Image.fromarray(pixels)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def count_question(grid: np.ndarray, spec: GridSpec, colour: str) -> Question:
    n = int((grid == spec.palette.index(colour)).sum())
    return Question("count", f"How many {colour} cells are there?", str(n))


def favourite_count_question(grid: np.ndarray, spec: GridSpec, colour: str) -> Question:
    """Regime B's `ref` kind: the colour was named before the image (prompts.chat_context), the question
    after it does not name it, so the answer needs text from before the image."""
    n = int((grid == spec.palette.index(colour)).sum())
    return Question("ref", FAVOURITE_QUESTION, str(n))


def total_question(grids: list[np.ndarray] | tuple, spec: GridSpec, colour: str) -> Question:
    """The multi-image kind: a count over every image of the request (errors add up across images)."""
    n = sum(int((g == spec.palette.index(colour)).sum()) for g in grids)
    return Question("total", f"How many {colour} cells are there in all the images?", str(n))


def cell_question(grid: np.ndarray, spec: GridSpec, row: int, col: int) -> Question:
    """Rows and columns are 1-based, counted from the top left."""
    colour = spec.palette[int(grid[row - 1, col - 1])]
    return Question("cell", f"What colour is the cell in row {row}, column {col}?", colour)


def row_question(grid: np.ndarray, spec: GridSpec, row: int, image: int | None = None) -> Question:
    """A row's colours left to right (1-based row): `cells` answer tokens, each read from one image
    token — the several-token, image-dependent answer that KV compression (issue 13) is measured on.
    `image`: the grid's 1-based ordinal among a prompt's images, named in the question (layout mrow)."""
    colours = [spec.palette[int(i)] for i in grid[row - 1]]
    which = f"row {row}" if image is None else f"row {row} of image {image}"
    return Question("row", f"What are the colours of {which}, left to right?", " ".join(colours))


def counts_question(grid: np.ndarray, spec: GridSpec) -> Question:
    """Every object colour's count, in palette order ("2 0 3 1"): several answer tokens, each a count over
    the image's few coloured cells. Issue 13's compression task: the row task's checkpoints never learned
    to read a row (their answers were the all-background row, right exactly as often as a row is empty),
    while counting is what the tiny model does learn (`count`, `multi.total` ~0.9)."""
    counts = [int((grid == spec.palette.index(c)).sum()) for c in spec.colours]
    names = ", ".join(spec.colours[:-1]) + f" and {spec.colours[-1]}" if len(spec.colours) > 1 else spec.colours[0]
    return Question("counts", f"How many {names} cells are there?", " ".join(map(str, counts)))


def present_question(grid: np.ndarray, spec: GridSpec) -> Question:
    """The object colours the image holds, in palette order ("red blue purple"; "none" for an empty
    grid): several answer tokens, each the presence of a colour anywhere in the image. Where counts
    aggregate over every cell (dropping background tokens changes what an averaging head reads), a
    presence is carried by any one of a colour's cells: the retrieval-like reading VL-Cache's
    selection is built for. Issue 13's second compression task."""
    present = [c for c in spec.colours if (grid == spec.palette.index(c)).any()]
    return Question("present", "Which colours are in the image?", " ".join(present) or "none")


def most_question(grid: np.ndarray, spec: GridSpec) -> Question | None:
    """None when the most common object colour is tied (the answer would be ambiguous)."""
    counts = np.bincount(grid.ravel(), minlength=len(spec.palette))[1:]
    top = np.flatnonzero(counts == counts.max())
    if len(top) != 1:
        return None
    return Question("most", f"Which colour has the most cells, apart from {BACKGROUND}?",
                    spec.colours[int(top[0])])


def random_question(grid: np.ndarray, spec: GridSpec, rng: np.random.Generator,
                    weights: dict[str, float]) -> Question:
    """One question of a kind drawn by `weights` (kind -> weight; a tied 'most' falls back to 'count')."""
    kinds = [k for k in KINDS if weights.get(k, 0) > 0]
    if not kinds:
        raise ValueError(f"no question kind has a positive weight in {weights}; kinds: {KINDS}")
    p = np.array([weights[k] for k in kinds], dtype=float)
    kind = kinds[rng.choice(len(kinds), p=p / p.sum())]
    if kind == "most":
        q = most_question(grid, spec)
        if q is not None:
            return q
        kind = "count"
    if kind == "count":
        return count_question(grid, spec, spec.colours[rng.integers(len(spec.colours))])
    if kind == "row":
        return row_question(grid, spec, int(rng.integers(1, spec.cells + 1)))
    if kind == "counts":
        return counts_question(grid, spec)
    if kind == "present":
        return present_question(grid, spec)
    row, col = random_coloured_cell(grid, rng)
    return cell_question(grid, spec, row, col)


def random_coloured_cell(grid: np.ndarray, rng: np.random.Generator, side: int | None = None) -> tuple[int, int]:
    """1-based (row, col) of a random object-coloured cell within the top-left side x side (any cell
    if none is coloured): asking about background cells would make "white" right most of the time."""
    side = side or grid.shape[0]
    sub = grid[:side, :side]
    cells = np.argwhere(sub != 0)
    if len(cells) == 0:
        cells = np.argwhere(np.ones_like(sub, dtype=bool))
    r, c = cells[rng.integers(len(cells))]
    return int(r) + 1, int(c) + 1
