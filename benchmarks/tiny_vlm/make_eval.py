"""Write the accuracy data set for a trained tiny model (benchmarks/accuracy.py's JSONL format).

    python -m benchmarks.tiny_vlm.make_eval --model /tmp/tiny-qwen2.5-vl --out /tmp/eval.jsonl

Held-out images, each asked `repeats` times with different questions and different filler lengths
before the question, so the image sits at a different position each time. Images come in groups: all
first occurrences of a group, then the second ones in another order, and so on. Only a first
occurrence computes the image; later ones are where reuse policies differ. The same image is the same
PNG bytes every time (the vlcache key is over the raw bytes). Ids are `<image>-<occurrence>-<kind>`;
each record also carries its `kind`.
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

import numpy as np

from benchmarks.tiny_vlm import prompts
from benchmarks.tiny_vlm.batches import TaskConfig
from benchmarks.tiny_vlm.grid_task import Question, png_bytes, random_grids, random_question, render

EVAL_SEED = 30_000  # apart from training (< 10_000 + held-out) and reuse_sim (20_000) streams


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


def eval_records(task: TaskConfig, images: int, repeats: int, group: int, seed: int = EVAL_SEED) -> list[dict]:
    if images < 1 or repeats < 1 or group < 1:
        raise ValueError(f"images, repeats and group must be >= 1, got {images}, {repeats}, {group}")
    rng = np.random.default_rng(seed)
    grids = random_grids(task.spec, images, rng)
    urls = ["data:image/png;base64," + base64.b64encode(png_bytes(render(g, task.spec))).decode() for g in grids]
    asks = [list(zip(distinct_questions(g, task, repeats, rng), distinct_fillers(repeats, task.max_filler_words, rng)))
            for g in grids]
    records = []
    for start in range(0, images, group):
        members = list(range(start, min(start + group, images)))
        for occ in range(repeats):
            for i in rng.permutation(members):
                q, filler = asks[i][occ]
                before, after = prompts.user_text(filler, q.text)
                records.append({"id": f"{i:04d}-{occ}-{q.kind}", "prompt": prompts.dataset_prompt(before, after),
                                "images": [urls[i]], "answer": q.answer, "kind": q.kind})
    return records


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory written by tiny_vlm.train (its task)")
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="occurrences per image (1 first + repeats - 1 reuses)")
    p.add_argument("--group", type=int, default=8, help="images interleaved together")
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    args = p.parse_args(argv)
    records = eval_records(TaskConfig.load(args.model), args.images, args.repeats, args.group, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    kinds = {k: sum(r["kind"] == k for r in records) for k in sorted({r["kind"] for r in records})}
    print(f"wrote {len(records)} records ({args.images} images x {args.repeats}; {kinds}) to {out}")


if __name__ == "__main__":
    main()
