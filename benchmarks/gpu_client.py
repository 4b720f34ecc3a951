"""Small OpenAI-API client for the GPU check: image chat requests against a running server.

    python benchmarks/gpu_client.py --port 30000 --label stock --out results.jsonl
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import time

import numpy as np
import requests
from PIL import Image


def png_data_url(width: int, height: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--label", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
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


if __name__ == "__main__":
    main()
