"""Does reusing an image's KV computed after another question cost accuracy? Plain-torch check (CPU or
GPU) of a trained checkpoint, before any server runs.

    python -m benchmarks.tiny_vlm.reuse_sim --model /tmp/tiny-qwen2.5-vl [--pairs 512] [--first-k 1,2,4]

For each pair: one held-out image and filler, question A and question B of the same kind and token
length (so the image sits at the same positions). Request B is answered with full recomputation and
with the image's K/V recorded in request A (`none`), or all but the first k image tokens from A
(`first_k`); see kv_splice.py. Prints accuracy per kind and how often B got A's answer.
Kind `ref` (regime B, checkpoints trained with layout b): the same system prompt and earlier turns but
another favourite colour before the image, the same question after it.

Also (simulation, not the server): the per-layer relative KV error of the reused image tokens under
`none`, ||K_A - K_B|| / ||K_B|| over the image tokens of every pair (V alike), K_B the fresh K/V of
request B (pre-RoPE, same positions, so the same as after RoPE: a rotation keeps norms).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks.tiny_vlm.batches import (Batch, Sample, TaskConfig, answer_logits, encode, greedy_correct,
                                         layout_b_sample, load_tokenizer, make_batch)
from benchmarks.tiny_vlm.checkpoint import load_checkpoint
from benchmarks.tiny_vlm.grid_task import (GridSpec, Question, cell_question, count_question, random_coloured_cell,
                                           random_grids)
from benchmarks.tiny_vlm.kv_splice import record_image_kv, splice_image_kv
from benchmarks.tiny_vlm.pixels import tokens_per_image
from benchmarks.tiny_vlm.prompts import favourite_statement, filler_text

SIM_SEED = 20_000  # images unseen in training (train.py draws from seeds < 10_000 + its held-out set)


def question_pair(grid: np.ndarray, spec: GridSpec, kind: str,
                  rng: np.random.Generator) -> tuple[Question, Question]:
    """Two different questions of one kind whose texts differ only in single-token words."""
    if kind == "count":
        a, b = rng.choice(len(spec.colours), size=2, replace=False)
        return count_question(grid, spec, spec.colours[a]), count_question(grid, spec, spec.colours[b])
    if kind == "cell":
        # Rows/columns 1..9 are one token each; more would change the token length.
        side = min(spec.cells, 9)
        a_cell = random_coloured_cell(grid, rng, side)
        for _ in range(100):
            b_cell = random_coloured_cell(grid, rng, side)
            if b_cell != a_cell:
                break
        return cell_question(grid, spec, *a_cell), cell_question(grid, spec, *b_cell)
    raise ValueError(f"no question pairs for kind {kind!r}; use count or cell")


@dataclasses.dataclass
class PairBatch:
    a: Batch        # request A: computes the image KV that B reuses
    b: Batch        # request B: the one scored
    b_with_a_answer: Batch  # B's prompt with A's answer as target: did B answer A's question?
    n_image: int


def ref_pair(grid: np.ndarray, task: TaskConfig, rng: np.random.Generator) -> tuple[Sample, Sample]:
    """Two layout-b `ref` samples that differ only in the favourite colour named before the image
    (single-token names: equal lengths)."""
    sb = layout_b_sample(grid, task, rng, kind="ref")
    context = " ".join([sb.system or ""] + [t for _, t in sb.history])
    colour_b = next(c for c in task.spec.colours if favourite_statement(c, True) in context
                    or favourite_statement(c, False) in context)
    colour_a = task.spec.colours[(task.spec.colours.index(colour_b) + 1 + int(rng.integers(len(task.spec.colours) - 1)))
                                 % len(task.spec.colours)]

    def swap(text: str) -> str:
        for in_system in (True, False):
            text = text.replace(favourite_statement(colour_b, in_system), favourite_statement(colour_a, in_system))
        return text

    n_a = int((grid == task.spec.palette.index(colour_a)).sum())
    sa = dataclasses.replace(sb, system=swap(sb.system or ""), history=tuple((r, swap(t)) for r, t in sb.history),
                             question=dataclasses.replace(sb.question, answer=str(n_a)))
    return sa, sb


def make_pairs(task: TaskConfig, tok, kind: str, n: int, rng: np.random.Generator, mean, std,
               device: str) -> PairBatch:
    spec = task.spec
    grids = random_grids(spec, n, rng)
    a, b, ba = [], [], []
    for g in grids:
        if kind == "ref":
            sa, sb = ref_pair(g, task, rng)
            a.append(sa)
            b.append(sb)
            ba.append(dataclasses.replace(sb, question=dataclasses.replace(sb.question, answer=sa.question.answer)))
            continue
        filler = filler_text(rng, task.max_filler_words)
        qa, qb = question_pair(g, spec, kind, rng)
        a.append(Sample(g, qa, filler))
        b.append(Sample(g, qb, filler))
        ba.append(Sample(g, dataclasses.replace(qb, answer=qa.answer), filler))
    for sa, sb in zip(a, b):
        pa, pb = encode(tok, spec, sa)[0], encode(tok, spec, sb)[0]
        if len(pa) != len(pb):
            raise AssertionError(f"pair prompts differ in length ({len(pa)} vs {len(pb)}): "
                                 f"{sa.question.text!r} / {sb.question.text!r}")
    mk = lambda s: make_batch(s, tok, spec, mean, std, device)  # noqa: E731
    return PairBatch(mk(a), mk(b), mk(ba), tokens_per_image(spec))


@torch.no_grad()
def run_pairs(model, pairs: PairBatch, keep_first: list[int]) -> dict[str, np.ndarray]:
    """Per-request correctness of B under full recomputation, none (and first_k), and whether B
    under none gave A's answer."""
    a, b = pairs.a, pairs.b
    if not torch.equal(a.image_start, b.image_start):
        raise AssertionError("A and B must place the image at the same positions")
    store: dict = {}
    with record_image_kv(model, a.image_start, pairs.n_image, store):
        answer_logits(model, a)
    fresh: dict = {}
    with record_image_kv(model, b.image_start, pairs.n_image, fresh):
        out = {"full": greedy_correct(answer_logits(model, b), b).cpu().numpy()}
    for (layer, which), kb in fresh.items():  # squared error and squared norm per layer, summed later
        ka = store[(layer, which)].float()
        out[f"kv_sq_err:{which}:{layer}"] = np.array([float(((ka - kb.float()) ** 2).sum())])
        out[f"kv_sq_norm:{which}:{layer}"] = np.array([float((kb.float() ** 2).sum())])
    with splice_image_kv(model, b.image_start, pairs.n_image, store, keep_first=0):
        out["none"] = greedy_correct(answer_logits(model, b), b).cpu().numpy()
        out["none_gave_A_answer"] = greedy_correct(answer_logits(model, pairs.b_with_a_answer),
                                                   pairs.b_with_a_answer).cpu().numpy()
    for k in keep_first:
        with splice_image_kv(model, b.image_start, pairs.n_image, store, keep_first=k):
            out[f"first_k:{k}"] = greedy_correct(answer_logits(model, b), b).cpu().numpy()
    same = np.array([sa.question.answer == sb.question.answer for sa, sb in zip(a.samples, b.samples)])
    out["none_gave_A_answer"] = out["none_gave_A_answer"] & ~same  # only where A's answer is wrong for B
    return out


def simulate(model_dir: str | Path, pairs: int, keep_first: list[int], device: str,
             batch: int = 64, seed: int = SIM_SEED) -> dict[str, dict[str, float]]:
    task = TaskConfig.load(model_dir)
    tok = load_tokenizer(model_dir)
    pre = json.loads((Path(model_dir) / "preprocessor_config.json").read_text())
    model = load_checkpoint(model_dir, device)
    rng = np.random.default_rng(seed)
    report = {}
    trained = {k for k, w in task.weights if w > 0} if task.layout_share("a") > 0 else set()
    if task.layout_share("b") > 0 and dict(task.b_weights).get("ref", 0) > 0:
        trained.add("ref")
    for kind in [k for k in ("count", "cell", "ref") if k in trained]:
        results: dict[str, list] = {}
        for i in range(0, pairs, batch):
            pb = make_pairs(task, tok, kind, min(batch, pairs - i), rng, pre["image_mean"], pre["image_std"], device)
            for name, v in run_pairs(model, pb, keep_first).items():
                results.setdefault(name, []).append(v)
        report[kind] = {name: float(np.concatenate(v).mean()) for name, v in results.items()
                        if not name.startswith("kv_sq_")}
        report[kind]["n"] = pairs
        layers = sorted({int(name.rsplit(":", 1)[1]) for name in results if name.startswith("kv_sq_err:")})
        report[kind]["kv_rel_error_none"] = {  # simulation: cached vs fresh image K/V, per layer
            which: [float(np.sqrt(np.concatenate(results[f"kv_sq_err:{which}:{l}"]).sum()
                                  / np.concatenate(results[f"kv_sq_norm:{which}:{l}"]).sum())) for l in layers]
            for which in ("k", "v")}
    return report


def usable_first_k(ks: list[int], task: TaskConfig) -> list[int]:
    """The k below the image's token count (k = all tokens is `full`); says which ones it drops, so a
    fixed --first-k list works for every grid size."""
    n_image = tokens_per_image(task.spec)
    dropped = [k for k in ks if k >= n_image]
    if dropped:
        print(f"first_k {dropped} skipped: the image has {n_image} tokens", file=sys.stderr)
    return [k for k in ks if k < n_image]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory written by tiny_vlm.train")
    p.add_argument("--pairs", type=int, default=512, help="request pairs per question kind")
    p.add_argument("--first-k", default="1,2,4", help="comma-separated k for first_k ('' for none)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="also write the report as JSON here")
    args = p.parse_args(argv)
    ks = [int(k) for k in args.first_k.split(",") if k.strip()]
    ks = usable_first_k(ks, TaskConfig.load(args.model))
    report = simulate(args.model, args.pairs, ks, args.device)
    cols = ["full", "none", *[f"first_k:{k}" for k in ks], "none_gave_A_answer"]
    print("kind   " + " ".join(f"{c:>18}" for c in cols) + "      n")
    for kind, r in report.items():
        print(f"{kind:6} " + " ".join(f"{r[c]:18.3f}" for c in cols) + f" {r['n']:6d}")
    print("per-layer relative KV error of the reused image tokens under none (simulation):")
    for kind, r in report.items():
        for which, errs in r["kv_rel_error_none"].items():
            print(f"  {kind:6} {which}: " + " ".join(f"{e:.3f}" for e in errs))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
