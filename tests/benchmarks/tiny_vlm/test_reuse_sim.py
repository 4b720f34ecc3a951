"""reuse_sim's --first-k list against the image's token count."""

from benchmarks.tiny_vlm.batches import TaskConfig
from benchmarks.tiny_vlm.grid_task import GridSpec
from benchmarks.tiny_vlm.pixels import tokens_per_image
from benchmarks.tiny_vlm.reuse_sim import usable_first_k


def test_first_k_at_or_above_the_image_size_is_dropped_with_a_note(capsys) -> None:
    task = TaskConfig(spec=GridSpec(cells=4, max_count=3))
    n = tokens_per_image(task.spec)
    assert n == 16
    assert usable_first_k([2, 8, n, 32], task) == [2, 8]
    assert "[16, 32] skipped: the image has 16 tokens" in capsys.readouterr().err


def test_first_k_below_the_image_size_is_kept_silently(capsys) -> None:
    task = TaskConfig()
    assert usable_first_k([2, 4, 8, 16, 32], task) == [2, 4, 8, 16, 32]
    assert capsys.readouterr().err == ""


def test_simulate_reports_every_policy_per_trained_kind(tiny_dir, tmp_path):
    """End to end on a 3-step checkpoint: the numbers are chance-level, the report's shape is not."""
    from benchmarks.tiny_vlm.reuse_sim import simulate
    from benchmarks.tiny_vlm.train import parse_args, train

    out = tmp_path / "ckpt"
    train(parse_args(["--out", str(out), "--size", "small", "--layers", "1", "--cells", "4", "--colours", "3",
                      "--max-count", "3", "--kinds", "count:1", "--batch", "4", "--held-out", "4",
                      "--max-steps", "3", "--tokenizer-from", str(tiny_dir), "--device", "cpu"]))
    report = simulate(out, pairs=6, keep_first=[1, 4], device="cpu", batch=4)
    assert list(report) == ["count"]
    r = report["count"]
    assert set(r) == {"full", "none", "first_k:1", "first_k:4", "none_gave_A_answer", "n", "kv_rel_error_none"}
    assert r["n"] == 6 and all(0.0 <= r[k] <= 1.0 for k in r if k not in ("n", "kv_rel_error_none"))
    # One text layer: one relative error each for K and V, and 0: layer 0's K/V of an image token is a
    # projection of its own embedding, whatever came before it (context reaches it from layer 1 on).
    assert r["kv_rel_error_none"] == {"k": [0.0], "v": [0.0]}


def test_ref_pairs_differ_only_in_the_favourite_colour(tiny_dir, spec):
    import numpy as np

    from benchmarks.tiny_vlm.batches import encode, load_tokenizer
    from benchmarks.tiny_vlm.grid_task import random_grids
    from benchmarks.tiny_vlm.reuse_sim import ref_pair

    task = TaskConfig(spec=spec, layouts=(("b", 1.0),))
    tok = load_tokenizer(tiny_dir)
    rng = np.random.default_rng(4)
    for g in random_grids(spec, 12, rng):
        a, b = ref_pair(g, task, rng)
        pa, pb = encode(tok, spec, a)[0], encode(tok, spec, b)[0]
        assert len(pa) == len(pb) and sum(x != y for x, y in zip(pa, pb)) == 1
        assert a.question.text == b.question.text and a.parts() == b.parts()
        colour_a = tok.decode([x for x, y in zip(pa, pb) if x != y]).strip()
        assert a.question.answer == str(int((g == spec.palette.index(colour_a)).sum()))


def test_simulate_covers_ref_pairs_of_a_layout_b_checkpoint(tiny_dir, tmp_path):
    from benchmarks.tiny_vlm.reuse_sim import simulate
    from benchmarks.tiny_vlm.train import parse_args, train

    out = tmp_path / "ckpt-b"
    train(parse_args(["--out", str(out), "--size", "small", "--layers", "2", "--cells", "4", "--colours", "3",
                      "--max-count", "3", "--layouts", "b:1", "--batch", "4", "--held-out", "4",
                      "--max-steps", "2", "--tokenizer-from", str(tiny_dir), "--device", "cpu"]))
    report = simulate(out, pairs=4, keep_first=[2], device="cpu", batch=4)
    assert list(report) == ["ref"] and report["ref"]["n"] == 4
    k0, k1 = report["ref"]["kv_rel_error_none"]["k"]
    assert k0 == 0.0 and k1 > 0.0  # the context before the image reaches its K/V from layer 1 on
