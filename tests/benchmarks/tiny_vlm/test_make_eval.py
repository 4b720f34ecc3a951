"""The eval set: accuracy.py's format, recurring identical images after different text, right answers."""

import base64
import re
import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.tiny_vlm import prompts
from benchmarks.tiny_vlm.batches import TaskConfig
from benchmarks.tiny_vlm.grid_task import RGB, GridSpec, cell_question, count_question, most_question, row_question
from benchmarks.tiny_vlm.make_eval import eval_records, multi_records

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


# ----- regimes B, the A-B knob, multi, calibration ----------------------------------------------

MIXED = TaskConfig(spec=GridSpec(cells=4, colours=("red", "green", "blue"), max_count=3), max_filler_words=12,
                   layouts=(("a", 0.4), ("b", 0.4), ("multi", 0.2)), multi_images=(2, 4), multi_max_count=2)


def _load(tmp_path, records, name="eval.jsonl"):
    import json
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return accuracy.load_dataset(path)


def _favourite(rec) -> str:
    context = " ".join([rec.get("system", "")] + [t["content"] for t in rec.get("history", [])])
    import re
    return re.search(r"favourite colour is (\w+)\.", context).group(1)


def test_regime_b_puts_the_context_before_and_the_question_after_the_image(tmp_path):
    records = eval_records(MIXED, images=6, repeats=4, group=3, a_share=0.0)
    loaded = _load(tmp_path, records)
    assert {r["layout"] for r in records} == {"b"} and sum(r.repeat for r in loaded) == 18
    for r, rec in zip(records, loaded):
        assert r["prompt"].startswith(prompts.IMAGE_MARKER) and r["prompt"].endswith("\n" + prompts.ANSWER_CUE)
        msgs = rec.messages()
        assert msgs[0]["role"] == "system" and msgs[-1]["content"][0]["type"] == "image_url"
        assert [m["role"] for m in msgs[1:-1]] == ["user", "assistant"] * ((len(msgs) - 2) // 2)
        grid = _grid_of(r["images"][0], MIXED.spec)
        question = r["prompt"].split(prompts.IMAGE_MARKER)[1].split("\n")[0]
        if r["kind"] == "b.ref":
            assert question == prompts.FAVOURITE_QUESTION
            assert r["answer"] == str(int((grid == MIXED.spec.palette.index(_favourite(r))).sum()))
        else:
            assert r["answer"] == _answer(grid, MIXED.spec, question)
    # Every occurrence of an image has its own context before it: no prefix-cache hit reaches the image.
    by_image: dict = {}
    for r in records:
        by_image.setdefault(r["images"][0], set()).add((r.get("system"), str(r.get("history"))))
    assert all(len(v) == 4 for v in by_image.values())
    assert {r["kind"] for r in eval_records(MIXED, images=30, repeats=4, group=8, a_share=0.0)} >= {"b.ref", "b.count"}


def test_the_knob_keeps_the_images_and_mixes_the_layouts():
    shares = {}
    images = None
    for s in (0.0, 0.5, 1.0):
        records = eval_records(MIXED, images=20, repeats=4, group=5, a_share=s)
        shares[s] = sum(r["layout"] == "a" for r in records) / len(records)
        urls = sorted({r["images"][0] for r in records})
        assert images is None or urls == images
        images = urls
    assert shares[0.0] == 0.0 and shares[1.0] == 1.0 and 0.35 < shares[0.5] < 0.65
    # a_share 1 is the regime-A stream of earlier versions.
    assert eval_records(MIXED, 5, 3, 2, a_share=1.0) == eval_records(MIXED, 5, 3, 2)


def test_multi_requests_come_in_rounds_with_reused_and_new_images(tmp_path):
    records = multi_records(MIXED, requests=12, rounds=3)
    loaded = _load(tmp_path, records)
    waves = accuracy.phases(loaded)
    # A record runs in a wave no later than its round (after the rounds it reuses from); round 0 first.
    wave_of = {r.id: i for i, w in enumerate(waves) for r in w}
    assert all(wave_of[r.id] <= int(r.id.split("-r")[1][0]) for r in loaded) and len(waves) <= 3
    assert [r.id for r in waves[0]] == [r.id for r in loaded if "-r0-" in r.id]
    assert all(r.n_reused == 0 for r in waves[0]) and all(r.n_reused >= 1 for w in waves[1:] for r in w)
    round0 = {u for r in loaded if "-r0-" in r.id for u in r.images}
    recurring = {u for r in loaded for u in r.images if sum(u in x.images for x in loaded) > 1}
    assert recurring and recurring <= round0  # first-generation KV only: stored after new text
    assert [r.n_reused for r in loaded] == [r["n_reused"] for r in records]
    assert any(0 < r.n_reused < len(r.images) for r in loaded)  # some reused, some new
    for r in records:
        assert 2 <= len(r["images"]) <= 4 and len(set(r["images"])) == len(r["images"])
        assert r["prompt"].count(prompts.IMAGE_MARKER) == len(r["images"]) and r["kind"] == "multi.total"
        colour = r["prompt"].split("How many ")[1].split(" cells")[0]
        spec = MIXED.multi_spec
        total = sum(int((_grid_of(u, spec) == spec.palette.index(colour)).sum()) for u in r["images"])
        assert r["answer"] == str(total)
    assert len({r["prompt"].split(prompts.IMAGE_MARKER)[0] for r in records}) == len(records)


def test_regimes_need_the_layouts_the_checkpoint_was_trained_on(tmp_path):
    import argparse

    from benchmarks.tiny_vlm.make_eval import regime_records

    args = argparse.Namespace(images=2, repeats=2, group=2, seed=1, multi_requests=3, multi_rounds=3)
    with pytest.raises(SystemExit, match="needs layout 'b'"):
        regime_records(TASK, "B", args)
    with pytest.raises(SystemExit, match="unknown regime"):
        regime_records(MIXED, "Z", args)
    with pytest.raises(SystemExit, match="regime C needs counts or present questions"):
        regime_records(MIXED, "C", args)
    assert {r["layout"] for r in regime_records(MIXED, "mix:0.5", args)} <= {"a", "b"}


def test_regime_c_asks_every_colours_count_of_one_new_image_each():
    import argparse

    from benchmarks.tiny_vlm.make_eval import regime_records

    counts = TaskConfig(spec=TASK.spec, max_filler_words=12, layouts=(("b", 1.0),), b_weights=(("counts", 1.0),))
    records = regime_records(counts, "C", argparse.Namespace(images=5, seed=3))
    assert len(records) == 5 and {r["kind"] for r in records} == {"b.counts"}
    assert len({u for r in records for u in r["images"]}) == 5 and all(len(r["images"]) == 1 for r in records)
    for r in records:
        assert len(r["answer"].split()) == len(TASK.spec.colours) and all(c.isdigit() for c in r["answer"].split())
        assert r["prompt"].endswith(f"{' and '.join([', '.join(TASK.spec.colours[:-1]), TASK.spec.colours[-1]])} "
                                    "cells are there?\nAnswer:")


def test_cli_writes_one_file_per_regime_and_calibration_requests(tmp_path, capsys):
    import json

    from benchmarks.tiny_vlm.make_eval import main

    (tmp_path / "ckpt").mkdir()
    MIXED.save(tmp_path / "ckpt")
    main(["--model", str(tmp_path / "ckpt"), "--out-dir", str(tmp_path / "d"), "--regimes", "A,B,multi,mix:0.5",
          "--images", "4", "--repeats", "3", "--group", "2", "--multi-requests", "6", "--calibration", "3"])
    names = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert names == ["A.jsonl", "B.jsonl", "calibration.jsonl", "mix-0.5.jsonl", "multi.jsonl"]
    cal = [json.loads(line) for line in (tmp_path / "d" / "calibration.jsonl").read_text().splitlines()]
    assert all(set(c) == {"id", "messages"} and c["messages"][-1]["role"] == "user" for c in cal)
    cal_urls = {p["image_url"]["url"] for c in cal for p in c["messages"][-1]["content"] if p["type"] == "image_url"}
    eval_urls = {u for f in names if f != "calibration.jsonl"
                 for line in (tmp_path / "d" / f).read_text().splitlines() for u in json.loads(line)["images"]}
    assert cal_urls and not cal_urls & eval_urls  # training-distribution images, never the eval images
    assert "wrote calibration requests" in capsys.readouterr().out


def test_regime_r_asks_each_image_once_for_a_row_after_its_context():
    import argparse

    from benchmarks.tiny_vlm.make_eval import regime_records

    rows = TaskConfig(spec=TASK.spec, max_filler_words=12, layouts=(("b", 1.0),),
                      b_weights=(("count", 0.5), ("row", 0.5)))
    args = argparse.Namespace(images=6, repeats=3, group=2, seed=1, multi_requests=3, multi_rounds=3, row_images=1)
    records = [accuracy.parse_record(r, Path(".")) for r in regime_records(rows, "R", args)]
    assert len(records) == 6 and len({r.images[0] for r in records}) == 6 and {r.kind for r in records} == {"b.row"}
    for rec in records:
        grid = _grid_of(rec.images[0], TASK.spec)
        r = int(rec.prompt.split("row ")[1].split(",")[0])
        assert rec.prompt.startswith(prompts.IMAGE_MARKER) and rec.answer == row_question(grid, TASK.spec, r).answer
    with pytest.raises(SystemExit, match="row questions"):
        regime_records(MIXED, "R", args)


MROWS = TaskConfig(spec=TASK.spec, max_filler_words=12, layouts=(("mrow", 1.0),), row_images=4)


def test_regime_r_with_k_images_asks_a_row_of_one_of_them_after_them_all(tmp_path):
    import argparse

    from benchmarks.tiny_vlm.make_eval import regime_records

    args = argparse.Namespace(images=8, seed=1, row_images=4)
    records = regime_records(MROWS, "R", args)
    loaded = _load(tmp_path, records)
    assert len(records) == 8 and {r["kind"] for r in records} == {"mrow.row"}
    assert len({u for r in records for u in r["images"]}) == 32, "every request has 4 new images"
    named = set()
    for r, rec in zip(records, loaded):
        assert len(r["images"]) == 4 and r["prompt"].count(prompts.IMAGE_MARKER) == 4
        pieces = r["prompt"].split(prompts.IMAGE_MARKER)
        assert pieces[:4] == ["Image 1:", "Image 2:", "Image 3:", "Image 4:"] and pieces[4].endswith("\nAnswer:")
        row, image = (int(x) for x in re.search(r"row (\d) of image (\d),", pieces[4]).groups())
        assert r["answer"] == row_question(_grid_of(r["images"][image - 1], TASK.spec), TASK.spec, row).answer
        named.add(image)
        # What accuracy.py sends (and compression_accuracy.py scores against `answer`): the context,
        # then label, image, ..., the question.
        content = rec.messages()[-1]["content"]
        assert [c["type"] for c in content] == ["text", "image_url"] * 4 + ["text"]
        assert [c["image_url"]["url"] for c in content if c["type"] == "image_url"] == r["images"]
        assert rec.messages()[0]["role"] == "system" and not rec.repeat
    assert len(named) >= 3
    with pytest.raises(SystemExit, match="needs layout 'mrow'"):
        regime_records(MIXED, "R", args)
    with pytest.raises(SystemExit, match="pass --row-images 4"):
        regime_records(MROWS, "R", argparse.Namespace(images=2, seed=1, row_images=1))
    with pytest.raises(SystemExit, match="train with --row-images 3"):
        regime_records(MROWS, "R", argparse.Namespace(images=2, seed=1, row_images=3))


def test_regime_r_with_one_image_is_unchanged():
    from benchmarks.tiny_vlm.make_eval import row_records

    rows = TaskConfig(spec=TASK.spec, max_filler_words=12, layouts=(("b", 1.0),), b_weights=(("row", 1.0),))
    assert row_records(rows, 5, seed=2) == row_records(rows, 5, seed=2, row_images=1)
    assert [len(r["images"]) for r in row_records(rows, 5, seed=2)] == [1] * 5


def test_regime_c_asks_the_image_wide_question_the_checkpoint_was_trained_on():
    import argparse

    from benchmarks.tiny_vlm.make_eval import regime_records

    present = TaskConfig(spec=TASK.spec, max_filler_words=12, layouts=(("b", 1.0),), b_weights=(("present", 1.0),))
    records = regime_records(present, "C", argparse.Namespace(images=5, seed=3))
    assert {r["kind"] for r in records} == {"b.present"} and len(records) == 5
    for r in records:
        assert r["prompt"].endswith("Which colours are in the image?\nAnswer:")
        assert r["answer"] == "none" or set(r["answer"].split()) <= set(TASK.spec.colours)
