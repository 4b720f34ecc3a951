"""Compression on a live server (dummy weights): every request answered, the KV trimmed and given back.

    python benchmarks/compression_smoke.py --port 30000 [--out smoke.json]

Against a server started with --enable-vlcache --vlcache-compress-ratio 1.0 (and what compression
needs: --decode-attention-backend triton --disable-overlap-schedule). Sends image chat requests at
alpha 1.0 and 0.1 (per-request override; 1080p and 4K images, 32 output tokens, some concurrent, one
image asked twice after other text: reuse and compression together), then reads the compression
gauges. Checks: every request 200; alpha 1.0 gives the same text as the server's first answer to it
(greedy, the unchanged path); alpha 0.1 requests were compressed (`compressed_requests` grew by them,
`compress_freed_slots` > 0, `compress_not_captured` 0); decode replayed its CUDA graphs (no
`compress_graph_fallbacks`); /health answers. Dummy weights: the texts say
nothing about accuracy (benchmarks/compression_bench.sh does, on the trained tiny model).
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import launch  # noqa: E402
from images import photo_data_url  # noqa: E402

GAUGES = ("compressed_requests", "compress_freed_slots", "compress_not_captured", "compress_graph_fallbacks")


def body(image: str, text: str, alpha: Optional[float], max_tokens: int) -> dict:
    out = {"model": "default", "temperature": 0, "max_tokens": max_tokens, "ignore_eos": True,
           "messages": [{"role": "user", "content": [{"type": "text", "text": text},
                                                     {"type": "image_url", "image_url": {"url": image}},
                                                     {"type": "text", "text": "Describe the image."}]}]}
    if alpha is not None:
        out["custom_params"] = {"vlcache": {"compress_ratio": alpha}}
    return out


def ask(url: str, b: dict) -> dict:
    status, text = launch.http_post(url + "/v1/chat/completions", b, timeout_s=300)
    if status != 200:
        return {"status": status, "error": text[:300]}
    j = json.loads(text)
    return {"status": status, "text": j["choices"][0]["message"]["content"],
            "cached_tokens": ((j.get("usage") or {}).get("prompt_tokens_details") or {}).get("cached_tokens")}


def gauges(url: str) -> dict[str, float]:
    status, text = launch.http_get(url + "/metrics")
    g = launch.parse_vlcache_gauges(text) if status == 200 else {}
    return {k: g.get(k, 0.0) for k in GAUGES}


def run(url: str, max_tokens: int = 32) -> dict:
    images = {"1080p": photo_data_url(1920, 1080, seed=1), "4k": photo_data_url(3840, 2160, seed=2)}
    before = gauges(url)
    plain = {k: ask(url, body(img, f"First look at {k}.", 1.0, max_tokens)) for k, img in images.items()}
    again = {k: ask(url, body(img, f"First look at {k}.", 1.0, max_tokens)) for k, img in images.items()}
    jobs = [body(images[k], f"Question {i} about {k}.", 0.1, max_tokens) for i in range(4) for k in images]
    with ThreadPoolExecutor(4) as pool:
        compressed = list(pool.map(lambda b: ask(url, b), jobs))
    after = gauges(url)
    grew = {k: after[k] - before[k] for k in GAUGES}
    health = launch.http_get(url + "/health")[0]
    statuses = [r["status"] for r in [*plain.values(), *again.values(), *compressed]]
    checks = {
        "every request 200": all(s == 200 for s in statuses),
        "alpha 1.0 repeats its answer": all(plain[k].get("text") == again[k].get("text") for k in images),
        "alpha 0.1 requests compressed": grew["compressed_requests"] >= len(jobs),
        "slots freed": grew["compress_freed_slots"] > 0,
        "none left uncaptured": grew["compress_not_captured"] == 0,
        "no eager decode past graph capacity": grew["compress_graph_fallbacks"] == 0,
        "/health 200": health == 200,
    }
    return {"statuses": statuses, "gauges_delta": grew, "checks": checks, "passed": all(checks.values()),
            "texts": {"alpha1": {k: v.get("text") for k, v in plain.items()},
                      "alpha0.1": [r.get("text") for r in compressed[:2]]},
            "errors": [r.get("error") for r in [*plain.values(), *again.values(), *compressed] if r.get("error")]}


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    report = run(f"http://127.0.0.1:{args.port}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print("\n".join(f"{'ok  ' if ok else 'FAIL'} {name}" for name, ok in report["checks"].items()))
    print(f"gauges grew by {report['gauges_delta']}; errors {report['errors'][:3]}")
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
