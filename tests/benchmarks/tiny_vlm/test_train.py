"""A few CPU training steps write a checkpoint that reloads, with its task and log."""

import json

import numpy as np
import pytest
import torch

from benchmarks.tiny_vlm import prompts
from benchmarks.tiny_vlm.batches import TaskConfig, make_batch, load_tokenizer, random_samples, route_mask
from benchmarks.tiny_vlm.checkpoint import load_checkpoint
from benchmarks.tiny_vlm.train import lr_at, parse_args, train


def test_a_few_steps_write_a_reloadable_checkpoint(tiny_dir, tmp_path):
    out = tmp_path / "ckpt"
    result = train(_tiny_args(tiny_dir, out, "--eval-every-s", "0", "--route-p", "0.5"))
    assert result["steps"] == 3 and len(result["log"]) == 3
    assert all(np.isfinite(e["loss"]) for e in result["log"])
    assert set(result["held_out_acc"]) >= {"all", "count"}
    assert TaskConfig.load(out).spec.cells == 4
    assert json.loads((out / "train_log.json").read_text())["steps"] == 3
    model = load_checkpoint(out)
    assert model.config.text_config.num_hidden_layers == 1


def test_cell_px_sets_the_image_size_of_task_and_processor(tiny_dir, tmp_path):
    out = tmp_path / "ckpt"
    train(_tiny_args(tiny_dir, out, "--eval-every-s", "0", "--cell-px", "56", "--max-steps", "1"))
    spec = TaskConfig.load(out).spec
    assert (spec.cells, spec.cell_px, spec.image_px) == (4, 56, 224)
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["max_pixels"] == 224 * 224


def test_route_mask_hides_the_user_text_from_tokens_after_the_image(tiny_dir, spec):
    tok = load_tokenizer(tiny_dir)
    samples = random_samples(TaskConfig(spec=spec, max_filler_words=6), 2, np.random.default_rng(0))
    batch = make_batch(samples, tok, spec, [0.5] * 3, [0.5] * 3, "cpu", routed=np.array([True, False]))
    mask = batch.attention_mask[:, 0].numpy()
    seq = batch.input_ids[0].tolist()
    user = [i for i, t in enumerate(seq) if t == prompts.IM_START][1] + 3
    vs, ve = seq.index(prompts.VISION_START), seq.index(prompts.VISION_END)
    assert tok.decode(seq[user - 3:user], skip_special_tokens=False) == "<|im_start|>user\n"
    causal = np.tril(np.ones_like(mask[0]))
    assert not mask[0, ve:, user:vs + 1].any()                  # answer side cannot see the question
    assert mask[0, vs + 1:ve, user:vs + 1].all()                # image tokens can
    assert mask[0, ve:, :user].all() and (mask[0, ve:, vs + 1:] == causal[ve:, vs + 1:]).all()
    assert (mask[1] == causal).all()                            # unrouted sample: plain causal
    assert make_batch(samples, tok, spec, [0.5] * 3, [0.5] * 3, "cpu").attention_mask is None


def test_lr_warms_up_then_decays_to_a_tenth():
    assert lr_at(0, 0.0, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(50, 0.0, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(50, 1.0, 1.0, 10) == pytest.approx(0.1)


def test_bad_colour_count_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--colours"):
        train(parse_args(["--out", str(tmp_path), "--colours", "9", "--device", "cpu"]))


def test_training_weights_are_fp32(tiny_dir):
    """The config says bfloat16 (what SGLang serves); AdamW on bf16 weights barely learns."""
    from benchmarks.tiny_vlm.train import build_model

    model = build_model(tiny_dir, 0, "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def _tiny_args(tiny_dir, out, *extra):
    return parse_args(["--out", str(out), "--size", "small", "--layers", "1", "--cells", "4", "--colours", "3",
                       "--max-count", "3", "--batch", "4", "--held-out", "4", "--max-steps", "3",
                       "--tokenizer-from", str(tiny_dir), "--device", "cpu", *extra])


def test_a_diverged_run_stops_and_writes_no_checkpoint(tiny_dir, tmp_path, monkeypatch):
    # lr NaN: step 1's update makes every weight NaN (finite gradients cannot prevent that).
    import benchmarks.tiny_vlm.train as train_mod

    monkeypatch.setattr(train_mod, "lr_at", lambda *a: float("nan"))
    out = tmp_path / "ckpt"
    with pytest.raises(FloatingPointError, match="non-finite weights"):
        train(_tiny_args(tiny_dir, out, "--eval-every-s", "1e9"))
    assert not list(out.glob("*.safetensors")) and not (out / "train_log.json").exists()


def test_steps_under_bf16_autocast_keep_the_loss_finite(tiny_dir, tmp_path, monkeypatch):
    """The CUDA path's bf16 autocast, run on CPU (fp32 weights, bf16 matmuls and attention)."""
    import benchmarks.tiny_vlm.train as train_mod

    monkeypatch.setattr(train_mod, "autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    result = train(_tiny_args(tiny_dir, tmp_path / "ckpt", "--warmup", "1", "--eval-every-s", "0"))
    assert len(result["log"]) == 3 and all(np.isfinite(e["loss"]) for e in result["log"])


MIXED_ARGS = ("--layouts", "a:0.4,b:0.3,multi:0.3", "--multi-images", "2,3", "--multi-max-count", "2")


def test_one_run_trains_every_layout_and_saves_them_with_the_task(tiny_dir, tmp_path):
    out = tmp_path / "mixed"
    result = train(_tiny_args(tiny_dir, out, "--eval-every-s", "1e9", "--held-out", "24", "--batch", "6", *MIXED_ARGS))
    assert result["steps"] == 3
    assert {k.split(".")[0] for k in result["held_out_acc"]} >= {"all", "b", "multi"}
    task = TaskConfig.load(out)
    assert task.layouts == (("a", 0.4), ("b", 0.3), ("multi", 0.3)) and task.multi_images == (2, 3)


def test_old_task_files_load_as_layout_a(tmp_path):
    spec_only = {"spec": {"cells": 4, "colours": ["red", "green"], "max_count": 3, "cell_px": 28},
                 "weights": [["count", 1.0]], "max_filler_words": 8}
    (tmp_path / "tiny_vlm_task.json").write_text(json.dumps(spec_only))
    task = TaskConfig.load(tmp_path)
    assert task.layouts == (("a", 1.0),) and task.spec.cells == 4
    with pytest.raises(ValueError, match="one digit"):
        TaskConfig(multi_images=(2, 5), multi_max_count=2)
    with pytest.raises(ValueError, match="unknown layouts"):
        TaskConfig(layouts=(("c", 1.0),))


def test_batches_of_mixed_layouts_and_their_route_masks(tiny_dir, spec):
    from benchmarks.tiny_vlm.batches import layout_b_sample, layout_multi_sample
    from benchmarks.tiny_vlm.grid_task import random_grids
    from benchmarks.tiny_vlm.pixels import tokens_per_image

    task = TaskConfig(spec=spec, max_filler_words=6, layouts=(("a", 1.0), ("b", 1.0), ("multi", 1.0)),
                      multi_images=(2, 3))
    tok = load_tokenizer(tiny_dir)
    rng = np.random.default_rng(2)
    grids = random_grids(spec, 4, rng)
    samples = [layout_b_sample(grids[0], task, rng, kind="ref"), layout_multi_sample(list(grids[1:4]), task, rng)]
    batch = make_batch(samples, tok, spec, [0.5] * 3, [0.5] * 3, "cpu", routed=np.array([True, True]))
    n = tokens_per_image(spec)
    assert batch.image_grid_thw.shape[0] == 4 and batch.pixel_values.shape[0] == 4 * n * 4
    mask = batch.attention_mask[:, 0].numpy()
    for b, s in enumerate(samples):
        seq = batch.input_ids[b].tolist()
        assert seq.count(prompts.IMAGE_PAD) == n * len(s.grids)
        vs = seq.index(prompts.VISION_START)
        ve = len(seq) - 1 - seq[::-1].index(prompts.VISION_END)
        start = 3 if s.layout == "b" else [i for i, t in enumerate(seq) if t == prompts.IM_START][1] + 3
        assert not mask[b, ve:, start:vs + 1].any() and mask[b, ve:, :start].all()
        assert mask[b, vs + 1:ve, :vs + 1].all()  # image tokens see the context
    # Layout b: the question is after the image, the favourite colour before it.
    text = tok.decode(batch.input_ids[0].tolist(), skip_special_tokens=False)
    assert text.index("favourite colour is") < text.index("<|vision_start|>") < text.index("my favourite colour?")
    routed = __import__("benchmarks.tiny_vlm.train", fromlist=["routed_samples"]).routed_samples(
        samples * 50, 1.0, {"count", "total"}, 0.0, rng)
    assert not routed[0::2].any() and routed[1::2].all()  # ref at route-p-ref 0, total at route-p 1


def test_a_non_finite_step_is_survived_and_a_broken_run_is_refused():
    import torch

    from benchmarks.tiny_vlm.train import check_finite, zero_nonfinite_grads

    model = torch.nn.Linear(3, 2)
    model.weight.grad = torch.tensor([[1.0, float("inf"), 2.0], [float("nan"), 0.5, -1.0]])
    zero_nonfinite_grads(model)
    assert torch.equal(model.weight.grad, torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.5, -1.0]]))
    losses = [torch.tensor(1.0), torch.tensor(float("nan")), torch.tensor(0.9)]
    assert check_finite(losses, 10, model) == 1, "one bad step is counted, not fatal"
    with pytest.raises(FloatingPointError, match="every loss"):
        check_finite([torch.tensor(float("nan"))] * 2, 10, model)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite weights"):
        check_finite(losses, 10, model)


def test_a_few_mrow_steps_write_a_checkpoint_make_eval_asks_rows_of(tiny_dir, tmp_path, capsys):
    from benchmarks.tiny_vlm.make_eval import main as make_eval

    out = tmp_path / "mrows"
    result = train(_tiny_args(tiny_dir, out, "--eval-every-s", "1e9", "--layouts", "mrow:1", "--row-images", "2"))
    assert result["steps"] == 3 and np.isfinite(result["final_loss"])
    assert set(result["held_out_acc"]) == {"all", "mrow.row"}
    task = TaskConfig.load(out)
    assert task.layouts == (("mrow", 1.0),) and task.row_images == 2
    make_eval(["--model", str(out), "--out-dir", str(tmp_path / "eval"), "--regimes", "R", "--images", "3",
               "--row-images", "2"])
    records = [json.loads(line) for line in (tmp_path / "eval" / "R.jsonl").read_text().splitlines()]
    assert [len(r["images"]) for r in records] == [2, 2, 2] and {r["kind"] for r in records} == {"mrow.row"}
    printed = capsys.readouterr().out
    # 4x4 cells: 16 tokens per image; 25 tokens after the last (the question, the generation prompt)
    assert "wrote 3 records (6 images; {'mrow.row': 3})" in printed and "25..25 after the last image" in printed
