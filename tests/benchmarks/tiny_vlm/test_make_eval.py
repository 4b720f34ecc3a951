"""The eval set: accuracy.py's format, recurring identical images after different text, right answers."""

import base64
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.tiny_vlm import prompts
from benchmarks.tiny_vlm.batches import TaskConfig
from benchmarks.tiny_vlm.grid_task import RGB, GridSpec, cell_question, count_question, most_question
from benchmarks.tiny_vlm.make_eval import eval_records

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
import accuracy  # noqa: E402

TASK = TaskConfig(spec=GridSpec(cells=4, colours=("red", "green", "blue"), max_count=3), max_filler_words=12)


def _grid_of(url: str, spec: GridSpec) -> np.ndarray:
    """Palette indices read back from a record's PNG."""
    px = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
    half = spec.cell_px // 2
    index = {RGB[c]: i for i, c in enumerate(spec.palette)}
    return np.array([[index[tuple(px[r * spec.cell_px + half, c * spec.cell_px + half])]
                      for c in range(spec.cells)] for r in range(spec.cells)])


def _answer(grid: np.ndarray, spec: GridSpec, question: str) -> str:
    for colour in spec.colours:
        if question == count_question(grid, spec, colour).text:
            return count_question(grid, spec, colour).answer
    for r in range(1, spec.cells + 1):
        for c in range(1, spec.cells + 1):
            if question == cell_question(grid, spec, r, c).text:
                return cell_question(grid, spec, r, c).answer
    most = most_question(grid, spec)
    assert most is not None and question == most.text, question
    return most.answer


def test_records_load_in_accuracy_py_and_repeat_with_other_text(tmp_path):
    records = eval_records(TASK, images=6, repeats=3, group=4)
    path = tmp_path / "eval.jsonl"
    import json
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    loaded = accuracy.load_dataset(path)
    assert len(loaded) == 18 and sum(r.repeat for r in loaded) == 12
    by_image: dict[str, list] = {}
    for r in records:
        by_image.setdefault(r["images"][0], []).append(r)
    assert len(by_image) == 6 and all(len(v) == 3 for v in by_image.values())  # same bytes each time
    for occurrences in by_image.values():
        befores = [r["prompt"].split(prompts.IMAGE_MARKER)[0] for r in occurrences]
        questions = [b.split("\n")[-1] for b in befores]
        assert len(set(questions)) == 3, questions  # a different question each time
        assert len({len(b) for b in befores}) == 3  # and a different position for the image
        assert all(r["prompt"].endswith(prompts.IMAGE_MARKER + prompts.ANSWER_CUE) for r in occurrences)
    # Messages as accuracy.py sends them: text, image, "Answer:".
    content = loaded[0].messages()[0]["content"]
    assert [c["type"] for c in content] == ["text", "image_url", "text"]


def test_answers_are_right_for_the_images():
    for r in eval_records(TASK, images=8, repeats=4, group=3, seed=5):
        grid = _grid_of(r["images"][0], TASK.spec)
        question = r["prompt"].split(prompts.IMAGE_MARKER)[0].split("\n")[-1]
        assert r["answer"] == _answer(grid, TASK.spec, question)
        assert r["id"].endswith("-" + r["kind"])


def test_groups_interleave_first_occurrences_before_repeats():
    records = eval_records(TASK, images=6, repeats=3, group=3)
    first_group = [int(r["id"].split("-")[0]) for r in records[:9]]
    assert set(first_group) == {0, 1, 2}
    assert [int(r["id"].split("-")[1]) for r in records[:9]] == [0] * 3 + [1] * 3 + [2] * 3
