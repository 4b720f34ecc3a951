"""Small OpenAI-API client for the GPU check: image chat requests against a running server.

    python benchmarks/gpu_client.py --port 30000 --label stock --out results.jsonl
"""

from __future__ import annotations

import argparse
import base64
import json
import time

import requests

from images import photo_data_url, png_data_url


def chat(port: int, text_before: str, image_url: str, max_tokens: int = 8) -> dict:
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": text_before},
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": "Describe the image."},
        ]}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    t0 = time.perf_counter()
    r = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=300)
    dt = time.perf_counter() - t0
    out = {"status": r.status_code, "latency_s": round(dt, 3)}
    if r.ok:
        j = r.json()
        usage = j.get("usage") or {}
        out.update(
            prompt_tokens=usage.get("prompt_tokens"),
            cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            text=j["choices"][0]["message"]["content"][:40],
        )
    else:
        out["error"] = r.text[:200]
    return out


def concurrent_same_new_image(port: int) -> list[dict]:
    """Two requests with the same never-seen image at once: both must succeed."""
    from concurrent.futures import ThreadPoolExecutor

    img = png_data_url(1280, 720, seed=99)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(chat, port, f"Concurrent request {i}:", img) for i in range(2)]
        return [f.result() for f in futures]


def pressure(port: int, label: str, out: str, n_distinct: int) -> None:
    """Distinct 4K images through a small KV pool, each after other text, then the first ones again."""
    urls = [photo_data_url(3840, 2160, seed=1000 + i) for i in range(n_distinct)]
    order = list(range(n_distinct)) + [0, 1, n_distinct - 1]
    with open(out, "a") as f:
        for step, i in enumerate(order):
            row = {"server": label, "probe": f"4K image {i} (step {step})", **chat(port, f"Step {step} text.", urls[i])}
            print(json.dumps(row), flush=True)
            f.write(json.dumps(row) + "\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--label", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--pressure", type=int, default=0, help="run the memory-pressure stream with N distinct 4K images")
    args = p.parse_args()
    if args.pressure:
        pressure(args.port, args.label, args.out, args.pressure)
        return
    img = png_data_url(1920, 1080, seed=1)
    probes = [
        ("first sight (1080p)", "You are a careful assistant. Here is a photo:", img),
        ("same request again", "You are a careful assistant. Here is a photo:", img),
        ("same image, other text", "Another system prompt, a longer one, then the photo:", img),
        ("corrupt image", "Here:", "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n garbage").decode()),
        ("after the corrupt one", "Still serving?", png_data_url(640, 480, seed=2)),
    ]
    with open(args.out, "a") as f:
        for name, text, url in probes:
            row = {"server": args.label, "probe": name, **chat(args.port, text, url)}
            print(json.dumps(row), flush=True)
            f.write(json.dumps(row) + "\n")
        for i, result in enumerate(concurrent_same_new_image(args.port)):
            row = {"server": args.label, "probe": f"same new image, concurrent {i}", **result}
            print(json.dumps(row), flush=True)
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
