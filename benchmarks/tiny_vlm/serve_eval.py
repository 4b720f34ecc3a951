"""Serve the trained checkpoint with stock SGLang and with vlcache under several policies at once, run
benchmarks/accuracy.py against all of them, stop them, and add a per-question-kind table.

    python -m benchmarks.tiny_vlm.serve_eval --model /tmp/tiny-qwen2.5-vl --dataset /tmp/eval.jsonl \\
        --out-dir $OUT/accuracy --log-dir /tmp/tiny_logs [--first-k 2,4,8,16,32]

Servers: stock, full, none and first_k:K (labels as accuracy.py reads them), real weights,
--mem-fraction-static 0.3 and a --max-total-tokens cap each so they fit one GPU side by side; the reference is
`full`. SGLang sizes a KV pool as (free after loading) - (free before) x (1 - mem fraction): a
neighbour allocating in between counts against it ("Loaded weights leave no GPU memory for the KV
cache"). A fraction of 0.3 leaves ~40 GB of room for that on an H100/H200, and --max-total-tokens keeps
each pool small, so the servers can start together.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH))
import accuracy  # noqa: E402
import launch  # noqa: E402

# KV slots per server: the eval set's prompts are ~100-300 tokens, a few hundred at a time; the cap
# keeps each server's pool small so later servers still find most of the GPU free.
MAX_TOTAL_TOKENS = 262_144
# Capturing the decode CUDA graphs took 54 s of a 136 s start on the H200 (4 batch sizes, tiny model);
# answers are at most 8 tokens, so every server (stock included) decodes eagerly and starts faster.
NO_CUDA_GRAPH = ["--disable-cuda-graph"]


def server_plan(first_ks: list[int]) -> list[tuple[str, list[str]]]:
    """(accuracy.py label, extra flags) per server; the reference `full` recomputes every token."""
    labels = ["stock", "full", "none", *(f"first_k:{k}" for k in first_ks)]
    return [(label, launch.vlcache_flags(label)) for label in labels]


def kind_table(accuracy_json: Path) -> str:
    """Accuracy on repeat occurrences per server and question kind (the kind ends each record id)."""
    data = json.loads(accuracy_json.read_text())
    cells: dict[str, dict[str, list[bool]]] = {}
    for r in data["requests"]:
        if r["repeat"]:
            cells.setdefault(r["server"], {}).setdefault(r["id"].rsplit("-", 1)[-1], []).append(r["correct"])
    kinds = sorted({k for v in cells.values() for k in v})
    lines = ["| server | " + " | ".join(f"{k} (repeats)" for k in kinds) + " |",
             "|---|" + "---|" * len(kinds)]
    for s in data["summary"]:
        row = cells.get(s["server"], {})
        lines.append(f"| {s['server']} | " + " | ".join(
            f"{sum(row[k]) / len(row[k]):.3f} ({len(row[k])})" if row.get(k) else "–" for k in kinds) + " |")
    return "\n".join(lines)


def log_tails(servers: list[launch.Server], lines: int = 40) -> str:
    return "\n\n".join(f"===== {s.label}: {s.log_path}\n{launch.tail(s.log_path, lines)}" for s in servers)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--out-dir", required=True, help="accuracy.py's results go here")
    p.add_argument("--log-dir", required=True, help="server logs (many files; keep them out of $OUT)")
    p.add_argument("--first-k", default="2,4,8,16,32")
    p.add_argument("--mem-fraction", type=float, default=0.3,
                   help="--mem-fraction-static per server: room for neighbours' allocations during its "
                        "start; its pool is --max-total-tokens")
    p.add_argument("--max-total-tokens", type=int, default=MAX_TOTAL_TOKENS, help="KV slots per server")
    p.add_argument("--base-port", type=int, default=30100)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--tails-to", default=None, help="write the server log tails here at the end")
    args = p.parse_args(argv)
    launch.stop_servers_on_sigterm()
    plan = server_plan([int(k) for k in args.first_k.split(",") if k.strip()])
    flags = launch.base_flags(args.model, dummy=False) + ["--max-total-tokens", str(args.max_total_tokens)]
    flags += NO_CUDA_GRAPH
    servers = [launch.Server(label.replace(":", "-"), flags + extra, args.base_port + i, args.log_dir,
                             mem_fraction=args.mem_fraction, timeout_s=420)
               for i, (label, extra) in enumerate(plan)]
    try:
        with launch.running(servers, first_alone=True):
            accuracy.main(["--dataset", args.dataset, "--reference", "full", "--out-dir", args.out_dir,
                           "--max-tokens", str(args.max_tokens)]
                          + [a for (label, _), s in zip(plan, servers) for a in ("--server", f"{label}={s.url}")])
    finally:
        if args.tails_to:
            Path(args.tails_to).write_text(log_tails(servers))
    table = kind_table(Path(args.out_dir) / "accuracy.json")
    with open(Path(args.out_dir) / "accuracy.md", "a") as f:
        f.write("\n## Accuracy on repeat occurrences by question kind\n\n" + table + "\n")
    print("\nAccuracy on repeat occurrences by question kind\n" + table)


if __name__ == "__main__":
    main()
