"""Write the accuracy data sets for a trained tiny model (benchmarks/accuracy.py's JSONL format), one
file per regime, and a calibration request file.

    python -m benchmarks.tiny_vlm.make_eval --model /tmp/tiny-qwen2.5-vl --out /tmp/eval.jsonl      (regime A)
    python -m benchmarks.tiny_vlm.make_eval --model /tmp/tiny-qwen2.5-vl --out-dir /tmp/tiny_eval \\
        --regimes A,B,multi,mix:0.5 --calibration 16           (A.jsonl B.jsonl multi.jsonl mix-0.5.jsonl calibration.jsonl)

Regimes (batches.LAYOUTS):
- A: the question before the image (layout a): reusing the image's KV computed after another question
  is wrong where the answer reads the question through the image tokens.
- B: a system prompt and earlier chat turns before the image, the question after it (layout b); `ref`
  questions ask about a colour named in that context, so reuse costs a little, not nothing.
- mix:S: the same images as A and B, each occurrence in layout a with probability S, else b (the knob
  between them: S = 1 is A, S = 0 is B; an image stored under one layout is reused under the other).
- R: rows for KV compression (issue 13): layout b, the question "What are the colours of row r, left to
  right?" after the image, each image once; the answer is `cells` colour names read from the image.
  `--row-images K` (K > 1, layout mrow): each request has K new labelled images ("Image 1:" ...) after
  the context and asks "What are the colours of row r of image i, left to right?" after all of them,
  so image tokens dominate the prompt as in VL-Cache's setting. `--images` requests either way.
  (The row checkpoints trained so far never learned rows: they answer the all-background row.)
- C: an image-wide question for KV compression (issue 13), the one the checkpoint was trained on
  (IMAGE_WIDE_KINDS): layout b, one image per request, the question after it. counts: "How many red,
  green, blue and yellow cells are there?" -> one count per colour ("2 0 3 1"); present: "Which colours
  are in the image?" -> the colours it holds ("red blue purple"). Both read the image's few coloured
  cells (a 16 x 16 grid: 256 image tokens, at most 12 coloured).
- multi: 2-4 images per request, question (a total count over all images) before them; requests come
  in rounds, round 0 all new images, later rounds some images of round 0, some new, in shuffled order
  (errors add up over the reused images).
Single-image sets: held-out images, each asked `repeats` times after different text (the text before
the image differs every time, so no prefix-cache hit reaches the image), in groups: all first
occurrences of a group, then the second ones in another order, and so on. The same image is the same
PNG bytes every time (the vlcache key is over the raw bytes). Ids end in the record's `kind`
(`count`, `b.ref`, `multi.total`, ...), which each record also carries.

Calibration (`--calibration N`): N fresh training-distribution images (not the eval images), each
asked `repeats` times in the layouts the checkpoint was trained on, plus multi requests, written as
OpenAI chat requests `{"messages": [...]}` for `python -m vlcache_sglang.calibrate --requests`.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.tiny_vlm import prompts
from benchmarks.tiny_vlm.batches import (Sample, TaskConfig, layout_b_sample, layout_mrow_sample, layout_multi_sample,
                                         load_tokenizer, prompt_ids)
from benchmarks.tiny_vlm.grid_task import Question, png_bytes, random_grids, random_question, render

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import accuracy  # noqa: E402  (one dataset format, one message builder)

EVAL_SEED = 30_000  # apart from training (< 10_000 + held-out) and reuse_sim (20_000) streams
CALIB_SEED = 40_000  # calibration images: the training distribution, neither eval nor held-out images
MULTI_SEED_OFFSET = 7
ROW_SEED_OFFSET = 11
IMAGE_WIDE_SEED_OFFSET = 13
IMAGE_WIDE_KINDS = ("counts", "present")  # regime C's questions: about the whole image, several answer tokens


def distinct_questions(grid: np.ndarray, task: TaskConfig, n: int, rng: np.random.Generator) -> list[Question]:
    """n questions with pairwise different texts (kinds drawn by the task's weights)."""
    weights = dict(task.weights)
    out: list[Question] = []
    for _ in range(100 * n):
        q = random_question(grid, task.spec, rng, weights)
        if all(q.text != o.text for o in out):
            out.append(q)
            if len(out) == n:
                return out
    raise ValueError(f"could not draw {n} distinct questions for one image; lower --repeats")


def distinct_fillers(n: int, max_words: int, rng: np.random.Generator) -> list[str]:
    """n filler texts of pairwise different word counts where the limit allows it."""
    counts = rng.choice(max_words + 1, size=n, replace=n > max_words + 1)
    return [prompts.filler_of_length(rng, int(c)) for c in counts]


def data_url(grid: np.ndarray, task: TaskConfig) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(render(grid, task.spec))).decode()


def record(rid: str, sample: Sample, urls: list[str], **extra) -> dict:
    """One accuracy.py record for a sample whose images are `urls` (in order)."""
    rec = {"id": f"{rid}-{sample.kind}", "prompt": sample.dataset_prompt(), "images": urls,
           "answer": sample.question.answer, "kind": sample.kind, "layout": sample.layout}
    if sample.system is not None:
        rec["system"] = sample.system
    if sample.history:
        rec["history"] = [{"role": r, "content": t} for r, t in sample.history]
    return {**rec, **extra}


def _distinct_b_sample(grid: np.ndarray, task: TaskConfig, rng: np.random.Generator, seen: set) -> Sample:
    """A layout b sample whose context before the image (system prompt + turns) is new for this image."""
    for _ in range(200):
        s = layout_b_sample(grid, task, rng)
        if (s.system, s.history) not in seen:
            seen.add((s.system, s.history))
            return s
    raise ValueError("could not draw distinct regime-B contexts for one image; lower --repeats")


def eval_records(task: TaskConfig, images: int, repeats: int, group: int, seed: int = EVAL_SEED,
                 a_share: float = 1.0) -> list[dict]:
    """Single-image records; each occurrence in layout a with probability a_share, else b. The images
    and the layout-a questions depend on the seed only, so every a_share asks about the same images."""
    if images < 1 or repeats < 1 or group < 1:
        raise ValueError(f"images, repeats and group must be >= 1, got {images}, {repeats}, {group}")
    if not 0.0 <= a_share <= 1.0:
        raise ValueError(f"a_share must be in [0, 1], got {a_share}")
    rng = np.random.default_rng(seed)
    grids = random_grids(task.spec, images, rng)
    urls = [data_url(g, task) for g in grids]
    asks = [list(zip(distinct_questions(g, task, repeats, rng), distinct_fillers(repeats, task.max_filler_words, rng)))
            for g in grids]
    b_rng = np.random.default_rng([seed, 1])  # layout b draws apart, so a_share = 1 is the old stream
    samples: list[list[Sample]] = []
    for i, g in enumerate(grids):
        seen: set = set()
        samples.append([Sample(g, q, filler) if b_rng.random() < a_share else _distinct_b_sample(g, task, b_rng, seen)
                        for q, filler in asks[i]])
    records = []
    for start in range(0, images, group):
        members = list(range(start, min(start + group, images)))
        for occ in range(repeats):
            for i in rng.permutation(members):
                records.append(record(f"{i:04d}-{occ}", samples[i][occ], [urls[i]]))
    return records


def multi_records(task: TaskConfig, requests: int, rounds: int = 3,
                  seed: int = EVAL_SEED + MULTI_SEED_OFFSET) -> list[dict]:
    """Multi-image records in rounds: round 0 only new images; in later rounds each request takes
    1..n of its n images from round 0 and the rest new, in shuffled order. `n_reused` says how many of
    a record's images recur."""
    if requests < rounds or rounds < 1:
        raise ValueError(f"need rounds >= 1 and requests >= rounds, got {requests} requests, {rounds} rounds")
    lo, hi = task.multi_images
    rng = np.random.default_rng(seed)
    urls: list[str] = []
    grids: list[np.ndarray] = []
    befores: set[str] = set()
    records, available = [], 0  # images of rounds before the current one: indices < available
    per_round = [requests // rounds + (r < requests % rounds) for r in range(rounds)]
    for rnd, n_req in enumerate(per_round):
        for _ in range(n_req):
            n = int(rng.integers(lo, hi + 1))
            m = 0 if rnd == 0 or available == 0 else int(rng.integers(1, min(n, available) + 1))
            chosen = [int(i) for i in rng.choice(available, size=m, replace=False)] if m else []
            for g in random_grids(task.multi_spec, n - m, rng):
                grids.append(g)
                urls.append(data_url(g, task))
                chosen.append(len(urls) - 1)
            chosen = [chosen[i] for i in rng.permutation(len(chosen))]
            for _ in range(200):  # a new text before the first image: no prefix-cache hit into the images
                filler = prompts.filler_of_length(rng, int(rng.integers(1, task.max_filler_words + 1)))
                sample = layout_multi_sample([grids[i] for i in chosen], task, rng, filler)
                if sample.parts()[0] not in befores:
                    befores.add(sample.parts()[0])
                    break
            records.append(record(f"m{len(records):04d}-r{rnd}", sample, [urls[i] for i in chosen], n_reused=m))
        if rnd == 0:
            # Reuse only round 0's images: each was stored at its first occurrence after new text only,
            # so it is first-generation KV whatever the server does with images stored after a reused one.
            available = len(urls)
    return records


def row_samples(task: TaskConfig, images: int, seed: int = EVAL_SEED + ROW_SEED_OFFSET,
                row_images: int = 1) -> list[Sample]:
    """Regime R's samples: `images` requests, each with `row_images` held-out images of its own and a row
    question after them (a context before): one image in layout b, several in layout mrow (the question
    names one). compression_sim.py reads the same stream."""
    if images < 1 or row_images < 1:
        raise ValueError(f"images and row_images must be >= 1, got {images}, {row_images}")
    rng = np.random.default_rng(seed)
    grids = random_grids(task.spec, images * row_images, rng)  # row_images 1: the same stream as before

    def sample(gs: np.ndarray) -> Sample:
        return layout_b_sample(gs[0], task, rng, kind="row") if len(gs) == 1 else layout_mrow_sample(list(gs), task, rng)

    return [sample(gs) for gs in grids.reshape(images, row_images, *grids.shape[1:])]


def row_records(task: TaskConfig, images: int, seed: int = EVAL_SEED + ROW_SEED_OFFSET,
                row_images: int = 1) -> list[dict]:
    """Regime R's records (row_samples), one request each."""
    return [record(f"r{i:04d}", s, [data_url(g, task) for g in s.grids])
            for i, s in enumerate(row_samples(task, images, seed, row_images))]


def image_wide_kind(task: TaskConfig) -> str | None:
    """The IMAGE_WIDE_KINDS question the checkpoint was trained on in layout b (the first, if several)."""
    if task.layout_share("b") <= 0:
        return None
    weights = dict(task.b_weights)
    return next((k for k in IMAGE_WIDE_KINDS if weights.get(k, 0) > 0), None)


def image_wide_samples(task: TaskConfig, kind: str, images: int,
                       seed: int = EVAL_SEED + IMAGE_WIDE_SEED_OFFSET) -> list[Sample]:
    """Regime C's samples: `images` requests of one held-out image each, layout b's context before it and
    the `kind` question (IMAGE_WIDE_KINDS: counts or present) after it."""
    if images < 1:
        raise ValueError(f"images must be >= 1, got {images}")
    if kind not in IMAGE_WIDE_KINDS:
        raise ValueError(f"regime C asks one of {IMAGE_WIDE_KINDS}, got {kind!r}")
    rng = np.random.default_rng(seed)
    return [layout_b_sample(g, task, rng, kind=kind) for g in random_grids(task.spec, images, rng)]


def image_wide_records(task: TaskConfig, kind: str, images: int,
                       seed: int = EVAL_SEED + IMAGE_WIDE_SEED_OFFSET) -> list[dict]:
    return [record(f"c{i:04d}", s, [data_url(g, task) for g in s.grids])
            for i, s in enumerate(image_wide_samples(task, kind, images, seed))]


def compression_samples(task: TaskConfig, images: int) -> list[Sample]:
    """The held-out samples of the compression task the checkpoint was trained on: regime C (counts or
    present) before regime R (rows of several images, then of one); what compression_sim.py and the
    server benchmark's eval set share."""
    kind = image_wide_kind(task)
    if kind:
        return image_wide_samples(task, kind, images)
    if task.layout_share("mrow") > 0:
        return row_samples(task, images, row_images=task.row_images)
    if task.layout_share("b") > 0 and dict(task.b_weights).get("row", 0) > 0:
        return row_samples(task, images)
    raise SystemExit(f"the checkpoint was trained on no compression task (layouts {task.layouts}, b kinds "
                     f"{task.b_weights}): train with --layouts b:1 --kinds-b counts:1 (or present:1, or a row task)")


def calibration_requests(task: TaskConfig, images: int, repeats: int, seed: int = CALIB_SEED) -> list[dict]:
    """OpenAI chat requests from the training distribution: the layouts in the checkpoint's shares."""
    a, b, multi = (task.layout_share(k) for k in ("a", "b", "multi"))
    recs = eval_records(task, images, repeats, group=max(1, images), seed=seed, a_share=a / (a + b) if a + b else 1.0)
    if multi > 0:
        recs += multi_records(task, max(3, images), rounds=3, seed=seed + MULTI_SEED_OFFSET)
    return [{"id": r["id"], "messages": accuracy.parse_record(r, Path(".")).messages()} for r in recs]


def regime_records(task: TaskConfig, regime: str, args: argparse.Namespace) -> list[dict]:
    """Records of one regime name: A, B, mix:S or multi."""
    def need(layout: str) -> None:
        if task.layout_share(layout) <= 0:
            raise SystemExit(f"regime {regime} needs layout {layout!r}, which the checkpoint was not trained on "
                             f"(its layouts: {task.layouts}); train with --layouts a:...,b:...,multi:...")

    if regime == "A":
        return eval_records(task, args.images, args.repeats, args.group, args.seed, a_share=1.0)
    if regime == "B":
        need("b")
        return eval_records(task, args.images, args.repeats, args.group, args.seed, a_share=0.0)
    if regime.startswith("mix:"):
        need("b")
        return eval_records(task, args.images, args.repeats, args.group, args.seed, a_share=float(regime[4:]))
    if regime == "multi":
        need("multi")
        return multi_records(task, args.multi_requests, args.multi_rounds, args.seed + MULTI_SEED_OFFSET)
    if regime == "R":
        k = args.row_images
        if k == 1:
            if task.layout_share("b") <= 0 < task.layout_share("mrow"):
                raise SystemExit(f"regime R: the checkpoint was trained on layout mrow only; pass --row-images "
                                 f"{task.row_images}")
            need("b")
            if dict(task.b_weights).get("row", 0) <= 0:
                raise SystemExit("regime R needs row questions in layout b, which the checkpoint was not trained "
                                 "on; train with --kinds-b ...,row:W")
        else:
            need("mrow")
            if task.row_images != k:
                raise SystemExit(f"regime R with --row-images {k}: the checkpoint's mrow samples have "
                                 f"{task.row_images} images; train with --row-images {k}")
        return row_records(task, args.images, args.seed + ROW_SEED_OFFSET, k)
    if regime == "C":
        need("b")
        kind = image_wide_kind(task)
        if kind is None:
            raise SystemExit("regime C needs counts or present questions in layout b, which the checkpoint was "
                             "not trained on; train with --kinds-b counts:1 (or present:1)")
        return image_wide_records(task, kind, args.images, args.seed + IMAGE_WIDE_SEED_OFFSET)
    raise SystemExit(f"unknown regime {regime!r}; choose from A, B, mix:S (0 <= S <= 1), multi, R, C")


def prompt_lengths(records: list[dict], model_dir: str | Path, task: TaskConfig) -> str | None:
    """'m tokens min..max (mean), tau after the last image' as SGLang builds the prompts: the budget
    alpha * m that compression keeps, against the post-vision window it always keeps. None without the
    checkpoint's tokenizer."""
    if not (Path(model_dir) / "tokenizer.json").is_file():
        return None
    tok = load_tokenizer(model_dir)
    m, tau = [], []
    for r in records:
        history = [(t["role"], t["content"]) for t in r.get("history", [])]
        ids = prompt_ids(tok, task.spec, r.get("system"), history, r["prompt"].split(prompts.IMAGE_MARKER))
        m.append(len(ids))
        tau.append(len(ids) - prompts.image_runs(ids)[-1][1])
    return (f"prompts of {min(m)}..{max(m)} tokens (mean {np.mean(m):.0f}), "
            f"{min(tau)}..{max(tau)} after the last image")


def regime_file(regime: str) -> str:
    return regime.replace(":", "-") + ".jsonl"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory written by tiny_vlm.train (its task)")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="one JSONL file: regime A")
    out.add_argument("--out-dir", help="one JSONL file per --regimes entry (and calibration.jsonl)")
    p.add_argument("--regimes", default="A,B,multi", help="with --out-dir: A, B, mix:S, multi, R, C (comma-separated)")
    p.add_argument("--images", type=int, default=64, help="images per set (regimes R, C: requests)")
    p.add_argument("--row-images", type=int, default=1,
                   help="regime R: images per request (1: layout b; K > 1: layout mrow, trained with --row-images K)")
    p.add_argument("--repeats", type=int, default=5, help="occurrences per image (1 first + repeats - 1 reuses)")
    p.add_argument("--group", type=int, default=8, help="images interleaved together")
    p.add_argument("--multi-requests", type=int, default=48)
    p.add_argument("--multi-rounds", type=int, default=3)
    p.add_argument("--calibration", type=int, default=0,
                   help="with --out-dir: this many training-distribution images for calibration.jsonl (0: none)")
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    args = p.parse_args(argv)
    task = TaskConfig.load(args.model)
    if args.out:
        sets = {Path(args.out): regime_records(task, "A", args)}
    else:
        regimes = [r.strip() for r in args.regimes.split(",") if r.strip()]
        sets = {Path(args.out_dir) / regime_file(r): regime_records(task, r, args) for r in regimes}
    for path, records in sets.items():
        write_jsonl(path, records)
        kinds = {k: sum(r["kind"] == k for r in records) for k in sorted({r["kind"] for r in records})}
        n_images = len({u for r in records for u in r["images"]})
        lengths = prompt_lengths(records, args.model, task)
        print(f"wrote {len(records)} records ({n_images} images; {kinds}) to {path}"
              + (f"; {lengths}" if lengths else ""))
    if args.out_dir and args.calibration:
        path = Path(args.out_dir) / "calibration.jsonl"
        write_jsonl(path, calibration_requests(task, args.calibration, min(args.repeats, 4)))
        print(f"wrote calibration requests ({args.calibration} training-distribution images) to {path}")


if __name__ == "__main__":
    main()
