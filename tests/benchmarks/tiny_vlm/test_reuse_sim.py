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
    assert set(r) == {"full", "none", "first_k:1", "first_k:4", "none_gave_A_answer", "n"} and r["n"] == 6
    assert all(0.0 <= r[k] <= 1.0 for k in r if k != "n")
