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
