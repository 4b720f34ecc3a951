"""Reuse check against a running server, and the comparison of servers afterwards.

    python benchmarks/reuse_check.py probe --port 30000 --label stock --out probes.jsonl
    python benchmarks/reuse_check.py compare probes.jsonl --baseline stock

Probes (greedy, logprobs of the generated tokens): an image first seen after text A, then the same
image after other texts, after another image, and the exact request again (prefix hit). `compare`
prints TTFT, prompt/cached tokens and, against the baseline server, whether the generated tokens
agree and the largest logprob difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import requests

from images import png_data_url


def _content(parts: list) -> list:
    return [{"type": "image_url", "image_url": {"url": p}} if p.startswith("data:") else {"type": "text", "text": p}
            for p in parts]


def chat_stream(port: int, system: str, parts: list, max_tokens: int) -> dict:
    body = {"model": "default", "temperature": 0, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 1,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": _content(parts)}]}
    t0 = time.perf_counter()
    ttft, tokens, logprobs, usage = None, [], [], {}
    with requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, stream=True, timeout=600) as r:
        if not r.ok:
            return {"status": r.status_code, "error": r.text[:300]}
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                lp = (choice.get("logprobs") or {}).get("content") or []
                if lp and ttft is None:
                    ttft = time.perf_counter() - t0
                for item in lp:
                    tokens.append(item["token"])
                    logprobs.append(item["logprob"])
    return {"status": 200, "ttft_s": round(ttft or 0.0, 4), "e2e_s": round(time.perf_counter() - t0, 4),
            "tokens": tokens, "logprobs": logprobs, "prompt_tokens": usage.get("prompt_tokens"),
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens")}


SYSTEMS = [
    "You are a helpful assistant.",
    "You are a meticulous analyst. Answer briefly and precisely, citing what you see.",
    "Another system prompt entirely, much longer than the others, so that the image that follows "
    "starts at a very different position: " + "context " * 60,
    "Short one.",
    "You review product photos for an online shop and flag defects. " * 4,
]


def probe(port: int, label: str, out: str, max_tokens: int) -> None:
    img = png_data_url(1920, 1080, seed=11)
    other = png_data_url(1280, 720, seed=12)
    warm = png_data_url(640, 480, seed=13)
    cases = [
        ("warm-up (excluded)", SYSTEMS[0], ["Warm up.", warm, "Describe."]),
        ("first sight", SYSTEMS[0], ["Here is a photo:", img, "Describe it."]),
        ("other text before", SYSTEMS[1], ["Look at this:", img, "Describe it."]),
        ("much longer text before", SYSTEMS[2], ["Consider:", img, "Describe it."]),
        ("after another image", SYSTEMS[3], ["First:", other, "then:", img, "Compare them."]),
        ("exact repeat (prefix hit)", SYSTEMS[1], ["Look at this:", img, "Describe it."]),
    ] + [(f"varying text {i}", SYSTEMS[4] + f" Variant {i}." * (i + 1), ["Photo:", img, "Any defects?"])
         for i in range(5)]
    with open(out, "a") as f:
        for name, system, parts in cases:
            row = {"server": label, "case": name, **chat_stream(port, system, parts, max_tokens)}
            f.write(json.dumps(row) + "\n")
            print(json.dumps({k: v for k, v in row.items() if k not in ("tokens", "logprobs")}), flush=True)


def compare(path: str, baseline: str) -> None:
    rows = [json.loads(line) for line in open(path)]
    base = {r["case"]: r for r in rows if r["server"] == baseline}
    print(f"| server | case | TTFT ms | prompt | cached | tokens = {baseline} | max abs dlogprob |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        b = base.get(r["case"])
        same = dlp = "-"
        if r.get("status") == 200 and b and b.get("status") == 200 and r["server"] != baseline:
            n = min(len(r["tokens"]), len(b["tokens"]))
            same = "yes" if r["tokens"] == b["tokens"] else f"no ({sum(x == y for x, y in zip(r['tokens'], b['tokens']))}/{n})"
            dlp = f"{max(abs(x - y) for x, y in zip(r['logprobs'][:n], b['logprobs'][:n])):.3f}" if n else "-"
        ttft = f"{1000 * r['ttft_s']:.0f}" if r.get("status") == 200 else f"HTTP {r.get('status')}"
        print(f"| {r['server']} | {r['case']} | {ttft} | {r.get('prompt_tokens')} | {r.get('cached_tokens')} | {same} | {dlp} |")
    print()
    print("| server | median TTFT ms, image after varying text | p90 |")
    print("|---|---|---|")
    for server in dict.fromkeys(r["server"] for r in rows):
        t = sorted(1000 * r["ttft_s"] for r in rows if r["server"] == server and r["case"].startswith("varying")
                   and r.get("status") == 200)
        if t:
            print(f"| {server} | {statistics.median(t):.0f} | {t[min(len(t) - 1, int(0.9 * len(t)))]:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("probe")
    a.add_argument("--port", type=int, required=True)
    a.add_argument("--label", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--max-tokens", type=int, default=8)
    c = sub.add_parser("compare")
    c.add_argument("path")
    c.add_argument("--baseline", default="stock")
    args = p.parse_args()
    if args.cmd == "probe":
        probe(args.port, args.label, args.out, args.max_tokens)
    else:
        compare(args.path, args.baseline)


if __name__ == "__main__":
    main()
