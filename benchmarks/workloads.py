"""Recurring-image workloads as JSONL for `python -m sglang.bench_serving --dataset-name openai
--backend sglang-oai-chat --dataset-path FILE`: images from a small pool come back after
*different* text (system prompts, chat histories of varying length), optionally in another order.

    python benchmarks/workloads.py --preset single-1080p --num-requests 200 --out single.jsonl
    python benchmarks/workloads.py --preset multi-4k --zipf 1.1 --seed 3 --out multi.jsonl

Each line: {"messages": [...], "max_tokens": N, "temperature": 0}. Images are inline data URLs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from typing import Iterator, Optional

import numpy as np

from images import page_data_url, photo_data_url

RESOLUTIONS = {"720p": (1280, 720), "1080p": (1920, 1080), "4k": (3840, 2160)}
WORDS = ("image chart revenue quarter screenshot button error dialog product photo colour shelf label "
         "price table column row trend figure caption legend axis total summary detail region corner").split()


@dataclasses.dataclass
class WorkloadSpec:
    num_requests: int = 100
    pool_size: int = 8  # distinct images the requests draw from
    resolution: str = "1080p"  # 720p | 1080p | 4k | mixed | page
    images_per_request: tuple[int, int] = (1, 1)  # inclusive range, 1..8
    system_words: tuple[int, int] = (5, 300)  # words of system prompt before the images
    history_turns: tuple[int, int] = (0, 0)  # earlier user/assistant turns before the images
    shuffle_order: bool = True  # images of a request in random order
    zipf: float = 0.0  # popularity skew (0: uniform)
    output_len: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.resolution not in (*RESOLUTIONS, "mixed", "page"):
            raise ValueError(f"resolution must be one of {[*RESOLUTIONS, 'mixed', 'page']}, got {self.resolution!r}")
        lo, hi = self.images_per_request
        if not 1 <= lo <= hi <= 8 or hi > self.pool_size:
            raise ValueError(f"images_per_request must satisfy 1 <= lo <= hi <= min(8, pool_size), got {lo, hi}")


PRESETS: dict[str, WorkloadSpec] = {
    "single-1080p": WorkloadSpec(pool_size=6, resolution="1080p"),
    "multi-4k": WorkloadSpec(pool_size=6, resolution="4k", images_per_request=(4, 4), system_words=(5, 100)),
    "chat-history": WorkloadSpec(pool_size=6, resolution="mixed", history_turns=(1, 6), system_words=(5, 60)),
    "doc-pages": WorkloadSpec(pool_size=24, resolution="page", images_per_request=(1, 3), system_words=(5, 40),
                              zipf=1.0, shuffle_order=False),
}


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _pool(spec: WorkloadSpec, size_override: Optional[tuple[int, int]]) -> list[str]:
    urls = []
    for i in range(spec.pool_size):
        if spec.resolution == "page":
            urls.append(page_data_url(*(size_override or (1240, 1754)), seed=spec.seed * 1000 + i))
            continue
        res = list(RESOLUTIONS)[i % 3] if spec.resolution == "mixed" else spec.resolution
        urls.append(photo_data_url(*(size_override or RESOLUTIONS[res]), seed=spec.seed * 1000 + i))
    return urls


def popularity(pool_size: int, zipf: float) -> np.ndarray:
    """P(image i) ∝ 1 / (i + 1)^zipf."""
    weights = 1.0 / np.arange(1, pool_size + 1) ** zipf
    return weights / weights.sum()


def generate(spec: WorkloadSpec, size_override: Optional[tuple[int, int]] = None) -> Iterator[dict]:
    """Requests of the workload; `size_override` (w, h) shrinks every image (for tests)."""
    rng = random.Random(spec.seed)
    np_rng = np.random.default_rng(spec.seed)
    pool = _pool(spec, size_override)
    probs = popularity(spec.pool_size, spec.zipf)
    for _ in range(spec.num_requests):
        n = rng.randint(*spec.images_per_request)
        picked = list(np_rng.choice(spec.pool_size, size=n, replace=False, p=probs))
        if spec.shuffle_order:
            rng.shuffle(picked)
        else:
            picked.sort()
        messages = [{"role": "system", "content": _words(rng, *spec.system_words)}]
        for _ in range(rng.randint(*spec.history_turns)):
            messages.append({"role": "user", "content": _words(rng, 5, 40)})
            messages.append({"role": "assistant", "content": _words(rng, 5, 60)})
        content = [{"type": "text", "text": _words(rng, 3, 20)}]
        content += [{"type": "image_url", "image_url": {"url": pool[i]}} for i in picked]
        content.append({"type": "text", "text": "Question: " + _words(rng, 4, 12) + "?"})
        messages.append({"role": "user", "content": content})
        yield {"messages": messages, "max_tokens": spec.output_len, "temperature": 0}


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=list(PRESETS), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--num-requests", type=int)
    p.add_argument("--pool-size", type=int)
    p.add_argument("--resolution", choices=[*RESOLUTIONS, "mixed", "page"])
    p.add_argument("--images-per-request", type=int, nargs=2, metavar=("LO", "HI"))
    p.add_argument("--history-turns", type=int, nargs=2, metavar=("LO", "HI"))
    p.add_argument("--zipf", type=float)
    p.add_argument("--no-shuffle", action="store_true")
    p.add_argument("--output-len", type=int)
    p.add_argument("--seed", type=int)
    args = p.parse_args(argv)
    overrides = {k: v for k, v in {
        "num_requests": args.num_requests, "pool_size": args.pool_size, "resolution": args.resolution,
        "images_per_request": tuple(args.images_per_request) if args.images_per_request else None,
        "history_turns": tuple(args.history_turns) if args.history_turns else None, "zipf": args.zipf,
        "output_len": args.output_len, "seed": args.seed,
        "shuffle_order": False if args.no_shuffle else None}.items() if v is not None}
    spec = dataclasses.replace(PRESETS[args.preset], **overrides)
    with open(args.out, "w") as f:
        for row in generate(spec):
            f.write(json.dumps(row) + "\n")
    print(f"wrote {spec.num_requests} requests ({args.preset}, {spec}) to {args.out}")


if __name__ == "__main__":
    main()
