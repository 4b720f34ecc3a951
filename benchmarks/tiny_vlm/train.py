"""Train the small Qwen2.5-VL on the grid task and write a checkpoint directory SGLang serves.

    python -m benchmarks.tiny_vlm.train --out /tmp/tiny-qwen2.5-vl --minutes 4          (GPU, layout a)
    python -m benchmarks.tiny_vlm.train --out /tmp/tiny-qwen2.5-vl --minutes 2.5 \
        --layouts a:0.45,b:0.3,multi:0.25                                   (GPU, every regime: accuracy_bench.sh)
    python -m benchmarks.tiny_vlm.train --out /tmp/tiny-mrows --minutes 6 --layers 8 \
        --layouts mrow:1 --row-images 4                       (GPU, rows of one of 4 images: compression_bench.sh)
    python -m benchmarks.tiny_vlm.train --out /tmp/tiny-cpu --minutes 8 --size small --cells 4 \
        --max-count 3 --kinds count:1 --batch 32 --max-filler-words 8                           (CPU)

Every step draws fresh images and questions (no data set on disk). Stops by wall clock; prints loss and
held-out accuracy per question kind; writes config/tokenizer (vlcache_sglang.model_dir), weights in the
released-checkpoint layout (checkpoint.py), the task (tiny_vlm_task.json) and the log (train_log.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

from benchmarks.tiny_vlm.batches import (B_KINDS, LAYOUTS, TaskConfig, answer_logits, greedy_correct,
                                         load_tokenizer, make_batch, random_samples)
from benchmarks.tiny_vlm.checkpoint import save_checkpoint
from benchmarks.tiny_vlm.grid_task import BACKGROUND, KINDS, RGB, GridSpec
from benchmarks.tiny_vlm.model_config import SIZES, write_tiny_model_dir
from benchmarks.tiny_vlm.vision_attention import use_windowed_sdpa

ALL_COLOURS = tuple(c for c in RGB if c != BACKGROUND)
HELD_OUT_SEED = 10_000  # held-out images: a random stream apart from training's (seed + 0)


def build_model(model_dir: Path, seed: int, device: str,
                init_std: float | None = None) -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(model_dir)
    if init_std is not None:  # training only: the checkpoint's config keeps its value
        for c in (config, config.text_config, config.vision_config):
            c.initializer_range = init_std
    # fp32 master weights: transformers builds the language model in the config's bfloat16, where
    # small AdamW updates round away (bf16 compute comes from autocast on CUDA).
    model = Qwen2_5_VLForConditionalGeneration(config).to(device=device, dtype=torch.float32)
    use_windowed_sdpa(model)
    return model


def autocast(device: str):
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_at(step: int, frac_time: float, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine by elapsed wall-clock fraction down to 10% of peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac_time, 1.0))))


def zero_nonfinite_grads(model: torch.nn.Module) -> None:
    """Non-finite gradient entries to 0, without a host sync. One bf16 overflow gave an inf gradient,
    clip_grad_norm_ then multiplied it by 0 (NaN), and the update wrote NaN into every weight: a
    2.5-minute run died at step 777 of 855 on the H200 (2026-12-01). With this, such a step moves
    the weights by its finite entries only, and `check_finite` counts it."""
    for p in model.parameters():
        if p.grad is not None:
            p.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def check_finite(losses: list[torch.Tensor], steps_done: int, model: torch.nn.Module | None = None) -> int:
    """The number of non-finite losses among the last len(losses) steps; FloatingPointError when the
    run is broken: every one of them non-finite, or non-finite weights. Checked at each log point,
    not every step (.item() would stall the GPU); the run stops before it writes a checkpoint."""
    if not losses:
        return 0
    bad = torch.nonzero(~torch.isfinite(torch.stack(losses))).flatten()
    broken_weights = model is not None and not all(bool(torch.isfinite(p).all()) for p in model.parameters())
    if broken_weights or len(bad) == len(losses):
        first = steps_done - len(losses) + int(bad[0]) + 1 if len(bad) else steps_done
        raise FloatingPointError(f"training diverged by step {first} (of {steps_done} run): "
                                 f"{'non-finite weights' if broken_weights else 'every loss non-finite'}; "
                                 "no checkpoint written")
    return len(bad)


def _mean_finite(losses: list[torch.Tensor]) -> float | None:
    t = torch.stack(losses)
    t = t[torch.isfinite(t)]
    return t.mean().item() if t.numel() else None


@torch.no_grad()
def held_out_accuracy(model, batches, device: str) -> dict[str, float]:
    """Greedy exact-match accuracy per question kind (and 'all') on fixed held-out batches."""
    model.eval()
    right: dict[str, list[bool]] = {}
    for batch in batches:
        with autocast(device):
            ok = greedy_correct(answer_logits(model, batch), batch).tolist()
        for s, o in zip(batch.samples, ok):
            right.setdefault(s.kind, []).append(o)
            right.setdefault("all", []).append(o)
    model.train()
    return {k: float(np.mean(v)) for k, v in sorted(right.items())}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--minutes", type=float, default=4.0, help="training wall-clock budget")
    # 8 cells: 224 px, 64 image tokens, windows of 4x4 tokens that batch evenly (vision_attention.py).
    p.add_argument("--cells", type=int, default=8, help="grid side in cells")
    # 56 px: each cell 2x2 image tokens, the same grid at twice the resolution (the redundancy of a
    # real image, where one object spans many patches: what KV compression relies on).
    p.add_argument("--cell-px", type=int, default=28, help="cell side in px, a multiple of 28 (one image token)")
    p.add_argument("--colours", type=int, default=4, help="number of object colours")
    p.add_argument("--max-count", type=int, default=5, help="most cells of one colour")
    p.add_argument("--max-filler-words", type=int, default=32)
    p.add_argument("--kinds", default="count:0.7,cell:0.2,most:0.1", help="layout a's question kinds and weights")
    p.add_argument("--layouts", default="a:1",
                   help="share of samples per layout (batches.LAYOUTS): a = question before the image, b = system "
                        "prompt / chat turns before it and the question after, multi = 2-4 images, a total count, "
                        "mrow = layout b's context, --row-images images, a row of one of them")
    p.add_argument("--kinds-b", default="count:0.25,cell:0.15,most:0.1,ref:0.5",
                   help="layout b's kinds (ref: how many cells have the favourite colour named before the image)")
    p.add_argument("--multi-images", default="2,4", help="fewest,most images of a multi sample")
    p.add_argument("--multi-max-count", type=int, default=2, help="most cells of one colour per multi image")
    p.add_argument("--row-images", type=int, default=TaskConfig.row_images,
                   help="images of an mrow sample (2..6; make_eval's regime R asks with --row-images the same)")
    # small: the size whose training the CPU runs checked (it learned faster per step than base there).
    p.add_argument("--size", choices=list(SIZES), default="small", help="model_config.SIZES entry")
    p.add_argument("--layers", type=int, default=None, help="text layers (default: the size's)")
    # 0.5: on the H200 (72 s of training) plain training (0.0) let the answer read the question directly,
    # so reuse cost little (count: full 1.00, none 0.97); 0.5 keeps full at 1.00 and drops none to 0.18;
    # 1.0 never learned to count (0.02). See README.md.
    p.add_argument("--route-p", type=float, default=0.5,
                   help="share of --route-kinds samples trained with batches.route_mask (the question "
                        "reaches the answer only through the image tokens); held-out accuracy never uses it")
    p.add_argument("--route-kinds", default="count,total",
                   help="layout a / multi question kinds the route mask may apply to (answering a cell question "
                        "through the image alone would need image tokens to work out their own row and column)")
    # Weaker than --route-p: layout b is the case where reuse should cost little, but not nothing.
    p.add_argument("--route-p-ref", type=float, default=0.25,
                   help="share of layout b `ref` samples trained with the route mask (the favourite colour "
                        "reaches the answer only through the image tokens)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--init-std", type=float, default=0.06,
                   help="weight init std for training (the config's 0.02 is tuned for 7B widths)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--held-out", type=int, default=512, help="held-out samples for accuracy")
    p.add_argument("--eval-every-s", type=float, default=30.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokenizer-from", default=None,
                   help="copy tokenizer.json from this model directory (hosts without dashscope)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (tests)")
    return p.parse_args(argv)


def _weights(flag: str, text: str, names: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    try:
        weights = tuple((k, float(w)) for k, w in (item.split(":") for item in text.split(",")))
    except ValueError:
        raise ValueError(f"{flag} wants name:weight,... (names {names}), got {text!r}") from None
    unknown = [k for k, _ in weights if k not in names]
    if unknown:
        raise ValueError(f"{flag}: unknown names {unknown}; choose from {names}")
    return weights


def task_from_args(args: argparse.Namespace) -> TaskConfig:
    if not 1 <= args.colours <= len(ALL_COLOURS):
        raise ValueError(f"--colours must be 1..{len(ALL_COLOURS)}, got {args.colours}")
    spec = GridSpec(cells=args.cells, colours=ALL_COLOURS[:args.colours], max_count=args.max_count,
                    cell_px=args.cell_px)
    try:
        lo, hi = (int(x) for x in args.multi_images.split(","))
    except ValueError:
        raise ValueError(f"--multi-images wants FEWEST,MOST, got {args.multi_images!r}") from None
    return TaskConfig(spec=spec, weights=_weights("--kinds", args.kinds, KINDS), max_filler_words=args.max_filler_words,
                      layouts=_weights("--layouts", args.layouts, LAYOUTS),
                      b_weights=_weights("--kinds-b", args.kinds_b, B_KINDS), multi_images=(lo, hi),
                      multi_max_count=args.multi_max_count, row_images=args.row_images)


def routed_samples(samples, route_p: float, route_kinds: set[str], route_p_ref: float,
                   rng: np.random.Generator) -> np.ndarray:
    """[B] bool: which samples train with batches.route_mask."""
    u = rng.random(len(samples))
    return np.array([(s.layout in ("a", "multi") and s.question.kind in route_kinds and x < route_p)
                     or (s.layout == "b" and s.question.kind == "ref" and x < route_p_ref)
                     for s, x in zip(samples, u)], dtype=bool)


def train(args: argparse.Namespace) -> dict:
    t0 = time.monotonic()
    task = task_from_args(args)
    out = Path(args.out)
    tok_json = Path(args.tokenizer_from) / "tokenizer.json" if args.tokenizer_from else None
    write_tiny_model_dir(out, task.spec.image_px, args.size, args.layers, tok_json)
    task.save(out)
    tok = load_tokenizer(out)
    pre = json.loads((out / "preprocessor_config.json").read_text())
    mean, std = pre["image_mean"], pre["image_std"]
    device = args.device
    model = build_model(out, args.seed, device, args.init_std)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0,
                            fused=device.startswith("cuda"))

    held_rng = np.random.default_rng(HELD_OUT_SEED + args.seed)
    held = [make_batch(random_samples(task, min(args.batch, args.held_out - i), held_rng), tok, task.spec,
                       mean, std, device) for i in range(0, args.held_out, args.batch)]
    rng = np.random.default_rng(args.seed)
    route_kinds = set(args.route_kinds.split(","))
    budget_s = args.minutes * 60
    log: list[dict] = []
    step, t_train, last_eval, losses = 0, time.monotonic(), time.monotonic(), []
    print(f"setup {t_train - t0:.1f} s; {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params; "
          f"{task.spec.cells}x{task.spec.cells} cells, {len(task.spec.colours)} colours; device {device}",
          flush=True)
    model.train()
    while True:
        elapsed = time.monotonic() - t_train
        if elapsed >= budget_s or (args.max_steps is not None and step >= args.max_steps):
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, elapsed / budget_s, args.lr, args.warmup)
        samples = random_samples(task, args.batch, rng)
        routed = routed_samples(samples, args.route_p, route_kinds, args.route_p_ref, rng)
        batch = make_batch(samples, tok, task.spec, mean, std, device, routed)
        with autocast(device):
            logits = answer_logits(model, batch)
        loss = torch.nn.functional.cross_entropy(logits.float(), batch.targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        zero_nonfinite_grads(model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.detach())  # no .item() here: the next batch is built while the GPU works
        step += 1
        if time.monotonic() - last_eval >= args.eval_every_s:
            nonfinite = check_finite(losses, step, model)
            acc = held_out_accuracy(model, held, device)
            entry = {"step": step, "s": round(time.monotonic() - t_train, 1),
                     "loss": _mean_finite(losses), "nonfinite_steps": nonfinite, "acc": acc}
            log.append(entry)
            print(json.dumps(entry), flush=True)
            losses, last_eval = [], time.monotonic()
    check_finite(losses, step, model)
    acc = held_out_accuracy(model, held, device)
    result = {"steps": step, "train_s": round(time.monotonic() - t_train, 1),
              "final_loss": _mean_finite(losses) if losses else None, "held_out_acc": acc,
              "log": log, "args": vars(args)}
    save_checkpoint(model, out)
    (out / "train_log.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"done: {step} steps in {result['train_s']} s; held-out accuracy {acc}; wrote {out}", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
