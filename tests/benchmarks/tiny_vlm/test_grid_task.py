"""The grid task: answers read back from the rendered pixels, one token per colour name."""

import numpy as np
import pytest
from PIL import Image

from benchmarks.tiny_vlm.grid_task import (BACKGROUND, RGB, GridSpec, cell_question, count_question, random_coloured_cell,
                                           most_question, png_bytes, present_question, random_grids,
                                           random_question, render, row_question)


def _cell_colours(img: Image.Image, spec: GridSpec) -> list[list[str]]:
    """Colour names read from the centre pixel of every cell of a rendered image."""
    by_rgb = {v: k for k, v in RGB.items()}
    px = np.asarray(img)
    half = spec.cell_px // 2
    return [[by_rgb[tuple(px[r * spec.cell_px + half, c * spec.cell_px + half])] for c in range(spec.cells)]
            for r in range(spec.cells)]


def test_answers_match_the_rendered_image():
    spec = GridSpec(cells=6, colours=("red", "blue", "green", "yellow"), max_count=5)
    rng = np.random.default_rng(1)
    for grid in random_grids(spec, 20, rng):
        img = Image.open(__import__("io").BytesIO(png_bytes(render(grid, spec))))
        assert img.size == (spec.image_px, spec.image_px)
        seen = _cell_colours(img.convert("RGB"), spec)
        flat = [c for row in seen for c in row]
        for colour in spec.colours:
            assert count_question(grid, spec, colour).answer == str(flat.count(colour))
        r, c = rng.integers(1, spec.cells + 1, size=2)
        q = cell_question(grid, spec, int(r), int(c))
        assert q.answer == seen[r - 1][c - 1] and f"row {r}, column {c}" in q.text
        row = row_question(grid, spec, int(r))
        assert row.answer.split(" ") == seen[r - 1] and f"row {r}," in row.text
        assert present_question(grid, spec).answer == (" ".join(c for c in spec.colours if c in flat) or "none")
        most = most_question(grid, spec)
        counts = {k: flat.count(k) for k in spec.colours}
        top = [k for k, v in counts.items() if v == max(counts.values())]
        assert (most is None) == (len(top) > 1)
        if most is not None:
            assert most.answer == top[0]


def test_counts_cover_zero_to_max_and_cells_are_uniform_squares():
    spec = GridSpec(cells=4, colours=("red", "green"), max_count=3)
    grids = random_grids(spec, 400, np.random.default_rng(0))
    counts = {int((g == 1).sum()) for g in grids}
    assert counts == {0, 1, 2, 3}
    px = np.asarray(render(grids[0], spec))
    cell = px[:spec.cell_px, :spec.cell_px].reshape(-1, 3)
    assert (cell == cell[0]).all()


def test_random_question_kinds_follow_weights_and_ties_fall_back_to_count():
    spec = GridSpec(cells=4, colours=("red", "green", "blue"), max_count=3)
    rng = np.random.default_rng(0)
    grids = random_grids(spec, 300, rng)
    kinds = [random_question(g, spec, rng, {"most": 1.0}).kind for g in grids]
    tied = sum(most_question(g, spec) is None for g in grids)
    assert kinds.count("count") == tied > 0
    assert {random_question(g, spec, rng, {"cell": 1.0}).kind for g in grids} == {"cell"}
    with pytest.raises(ValueError, match="kinds"):
        random_question(grids[0], spec, rng, {"count": 0.0})


@pytest.mark.parametrize("kwargs, match", [
    (dict(colours=("red", "teal")), "unknown colours"),
    (dict(colours=(BACKGROUND, "red")), "background"),
    (dict(cells=2, colours=("red", "blue"), max_count=3), "do not fit"),
    (dict(max_count=10, cells=20), "one digit"),
    (dict(cell_px=14), "multiple of 28"),
])
def test_bad_specs_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GridSpec(**kwargs)


def test_colour_names_and_digits_are_single_tokens(tiny_dir):
    from benchmarks.tiny_vlm.batches import load_tokenizer

    tok = load_tokenizer(tiny_dir)
    for word in [*RGB, *map(str, range(10))]:
        assert len(tok.encode(word, add_special_tokens=False).ids) == 1, word
        assert len(tok.encode(" " + word, add_special_tokens=False).ids) == (1 if word in RGB else 2), word


def test_cell_questions_ask_about_coloured_cells():
    spec = GridSpec(cells=8, colours=("red", "blue"), max_count=5)
    rng = np.random.default_rng(2)
    grids = random_grids(spec, 100, rng)
    answers = [random_question(g, spec, rng, {"cell": 1.0}).answer for g in grids if (g != 0).any()]
    assert answers and BACKGROUND not in answers
    empty = np.zeros((4, 4), dtype=np.int64)  # nothing coloured: any cell
    assert 1 <= min(random_coloured_cell(empty, rng)) and max(random_coloured_cell(empty, rng)) <= 4


def test_a_row_answer_is_one_token_per_cell_and_row_questions_cover_every_row(tiny_dir):
    from benchmarks.tiny_vlm.batches import load_tokenizer

    spec = GridSpec(cells=8, colours=("red", "green", "blue", "yellow"), max_count=5)
    rng = np.random.default_rng(3)
    grids = random_grids(spec, 200, rng)
    questions = [random_question(g, spec, rng, {"row": 1.0}) for g in grids]
    assert {q.kind for q in questions} == {"row"}
    assert {q.text for q in questions} == {f"What are the colours of row {r}, left to right?" for r in range(1, 9)}
    tok = load_tokenizer(tiny_dir)
    assert all(len(tok.encode(q.answer, add_special_tokens=False).ids) == spec.cells for q in questions[:20])
    # A zero weight leaves the random stream of the other kinds as it was.
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    assert [random_question(g, spec, a, {"count": 0.7, "cell": 0.3}).text for g in grids[:30]] == \
        [random_question(g, spec, b, {"count": 0.7, "cell": 0.3, "row": 0.0}).text for g in grids[:30]]


def test_present_names_the_colours_in_palette_order_and_none_for_an_empty_grid():
    spec = GridSpec(cells=4, colours=("red", "green", "blue"), max_count=2)
    grid = np.zeros((4, 4), dtype=np.int64)
    assert present_question(grid, spec).answer == "none"
    grid[3, 0], grid[0, 2] = 3, 1  # blue bottom left, red top right: palette order, not raster order
    assert present_question(grid, spec).answer == "red blue"
    answers = {present_question(g, spec).answer for g in random_grids(spec, 300, np.random.default_rng(0))}
    assert {"none", "red green blue", "green"} <= answers
