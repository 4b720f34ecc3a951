"""Where a recurring image's TTFT goes: compare image payload kinds against a text-only prompt.

    python benchmarks/ttft_breakdown.py --port 30000 --label first_k
Each case is sent once to warm up (first sight), then 5 times after different text; median TTFT.
"""

from __future__ import annotations

import argparse
import base64
import statistics

from images import photo_data_url, png_data_url
from reuse_check import chat_stream


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--label", required=True)
    args = p.parse_args()
    cases = {
        "1080p noise PNG (~6 MB)": png_data_url(1920, 1080, seed=0),
        "1080p photo-like JPEG": photo_data_url(1920, 1080, seed=1),
        "64x64 JPEG": photo_data_url(64, 64, seed=2),
    }
    print(f"| server | case | payload KB | first TTFT ms | median TTFT ms (5, after other text) | cached |")
    print("|---|---|---|---|---|---|")
    for name, url in cases.items():
        first = chat_stream(args.port, "Warm.", ["Image:", url, "Describe."], 4)
        ttfts, cached = [], None
        for i in range(5):
            r = chat_stream(args.port, f"System prompt variant {i}. " * (i + 1), ["Image:", url, "Describe."], 4)
            ttfts.append(1000 * r["ttft_s"])
            cached = r.get("cached_tokens")
        print(f"| {args.label} | {name} | {len(url) // 1024} | {1000 * first['ttft_s']:.0f} | "
              f"{statistics.median(ttfts):.0f} | {cached} |")
    text = " ".join(f"word{i}" for i in range(1300))
    runs = [chat_stream(args.port, f"Variant {i}.", [text], 4) for i in range(3)]
    t = [1000 * r["ttft_s"] for r in runs]
    print(f"| {args.label} | text only, {runs[-1].get('prompt_tokens')} prompt tokens | - | - | "
          f"{statistics.median(t):.0f} | {runs[-1].get('cached_tokens')} |")
    bad = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n garbage").decode()
    r = chat_stream(args.port, "x", ["Image:", bad, "Describe."], 4)
    print(f"| {args.label} | corrupt image | - | HTTP {r['status']} | {r.get('error', '')[:80]!r} | - |")


if __name__ == "__main__":
    main()
