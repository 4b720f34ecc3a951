"""Accuracy of VL-Cache KV compression (issue 13) on the trained tiny model's row task, through servers.

    python benchmarks/compression_accuracy.py --dataset /tmp/tiny_eval/R.jsonl \\
        --server vlcache=http://127.0.0.1:30001 --server uniform=http://127.0.0.1:30002 \\
        [--stock http://127.0.0.1:30000] --alphas 1.0,0.5,0.2,0.1,0.05 --out-dir $OUT/compression
    python benchmarks/compression_accuracy.py --dataset R.jsonl --model CKPT --log-dir DIR --out-dir DIR
        (launches stock and one compressing server per --budgets entry on CKPT, then the same)

Each `--server` was started with `--vlcache-compress-ratio 1.0` (compression on, nothing trimmed unless a
request asks) and its budget method (`--vlcache-compress-budget vlcache`, or `uniform`: the H2O-like
baseline, the same keep ratio at every layer). Every record (regime R of make_eval: "What are the
colours of row r, left to right?" after the image, answer = the row's colour names) is sent once per
alpha with `custom_params.vlcache = {"policy": "full", "compress_ratio": alpha}` (policy full: reuse
does not enter the comparison), greedy, after a cache flush. Per server and alpha: exact-match
accuracy, cell accuracy (answer words right at their position), agreement with the same server at
alpha 1.0 (the uncompressed reference: whole text, and tokens by position), errors. With `--stock`,
the alpha 1.0 rows also report agreement with stock SGLang (alpha 1.0 must equal it token for token).
Writes DIR/compression.{json,md} (+ compression.png, benchmarks/plot.py); the table is printed last.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import accuracy  # noqa: E402  (records, requests, passes)
import accuracy_report  # noqa: E402  (table cells)
import launch  # noqa: E402
import plot  # noqa: E402

ALPHAS = (1.0, 0.5, 0.2, 0.1, 0.05)


def cell_accuracy(text: str, answer: str) -> float:
    """Share of the answer's words the text has at the same position (a row read out cell by cell)."""
    want, got = accuracy.normalise(answer).split(), accuracy.normalise(text).split()
    return sum(a == b for a, b in zip(want, got)) / len(want) if want else 0.0


def token_agreement(text: str, reference: str) -> float:
    """Share of the reference's words the text repeats at the same position (1.0: the same answer)."""
    ref, got = reference.split(), text.split()
    if not ref:
        return float(not got)
    return sum(a == b for a, b in zip(ref, got)) / max(len(ref), len(got))


def kept_measured(window: dict) -> Optional[float]:
    """The kept share the server served over a pass (its gauges' deltas): Σ_l kept prompt tokens over
    Σ_l prompt tokens of the trimmed requests; None when none was trimmed (alpha 1.0, stock)."""
    prompt = window.get("compress_prompt_token_layers", 0.0)
    return window.get("compress_kept_token_layers", 0.0) / prompt if prompt else None


def summarise(label: str, alpha: float, results: list[dict], reference: Optional[list[dict]],
              records: list[accuracy.Record], stock: Optional[list[dict]] = None,
              window: Optional[dict] = None) -> dict:
    """One row: accuracy, cell accuracy, agreement with `reference` (the server's alpha 1.0 pass), the
    kept share measured over the pass (`window`: run_alpha's gauge deltas)."""
    answers = {r.id: r.answer for r in records}
    # A pass cut at the deadline leaves requests unsent: they are no answers, not wrong ones.
    sent = [r for r in results if accuracy.was_sent(r)]
    ok = [r for r in sent if r["error"] is None]
    row = {"server": label, "alpha": alpha, "kept_measured": kept_measured(window or {}),
           "n": len(sent), "not_sent": len(results) - len(sent), "errors": len(sent) - len(ok),
           "accuracy": accuracy.mean_or_none([r["correct"] for r in sent]),
           "cell_accuracy": accuracy.mean_or_none([cell_accuracy(r["text"], answers[r["id"]]) for r in ok]),
           # Ended by the model (EOS / a stop token), not by max_tokens: compressed answers that are right
           # and then run on show here, not in the cells.
           "stopped": accuracy.mean_or_none([r.get("finish_reason") == "stop" for r in ok]),
           "latency_s": accuracy.mean_or_none([r["latency_s"] for r in ok])}
    for name, ref in (("uncompressed", reference), ("stock", stock)):
        if ref is None:
            continue
        by_id = {r["id"]: r for r in ref}
        pairs = [(r, by_id[r["id"]]) for r in ok if by_id.get(r["id"], {}).get("error") is None]
        row[f"agree_{name}"] = accuracy.mean_or_none([a["text"] == b["text"] for a, b in pairs])
        row[f"token_agree_{name}"] = accuracy.mean_or_none([token_agreement(a["text"], b["text"]) for a, b in pairs])
    return row


def run_alpha(target: accuracy.Target, records: list[accuracy.Record], alpha: Optional[float], max_tokens: int,
              concurrency: int, timeout_s: float, stop_at: Optional[float]) -> tuple[list[dict], dict]:
    """One pass of every record at `alpha` (None: a stock server, no override), after a flush: the
    results and the server's gauge deltas over the pass."""
    override = None if alpha is None else {"policy": "full", "compress_ratio": alpha}
    return accuracy.run_pass(target, [records], max_tokens, concurrency, override, 0, flush=True,
                             timeout_s=timeout_s, stop_at=stop_at)


def errors_cell(row: dict) -> str:
    """Errors among the sent requests, and how many a cut-short pass never sent (accuracy is over `n`)."""
    cut = row.get("not_sent", 0)
    return f"{row['errors']} (n {row['n']}, {cut} not sent)" if cut else str(row["errors"])


def table_md(rows: list[dict]) -> str:
    def f(v: Optional[float], spec: str = ".3f") -> str:
        return accuracy_report.fmt(v, spec)

    lines = ["| server | α | kept (measured) | accuracy | cell accuracy | stopped | agreement with α = 1 "
             "(text / tokens) | agreement with stock | errors | latency s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        stock = f(r.get("agree_stock")) if "agree_stock" in r else "–"
        lines.append(f"| {r['server']} | {r['alpha']:g} | {f(r.get('kept_measured'))} | {f(r['accuracy'])} | "
                     f"{f(r['cell_accuracy'])} | "
                     f"{f(r.get('stopped'))} | {f(r.get('agree_uncompressed'))} / "
                     f"{f(r.get('token_agree_uncompressed'))} | {stock} | {errors_cell(r)} | {f(r['latency_s'], '.3f')} |")
    return "\n".join(lines)


def prior_line(prior: float, rows: list[dict]) -> str:
    """The answer prior, and a warning when the uncompressed accuracy does not clear it: compressing the KV
    of a model that ignores the image cannot lose anything the table could show."""
    best = max((r["accuracy"] for r in rows if r["alpha"] == 1.0 and r["accuracy"] is not None), default=None)
    line = f"Answer prior (the commonest answer's share of the records): {prior:.3f}."
    if best is not None and accuracy.at_prior(best, prior):
        line += (f" **The uncompressed accuracy ({best:.3f}) does not clear it: the model answers without reading "
                 "the image, and this table says nothing about compression.**")
    return line


# The options a budget label may add to its method (METHOD+sinkN+shareS), and their server flags.
_BUDGET_OPTIONS = {"sink": ("--vlcache-compress-sink-tokens", str.isdigit),
                   "share": ("--vlcache-compress-uniform-share", lambda v: v.replace(".", "", 1).isdigit())}


def compression_server_flags(budget: str) -> list[str]:
    """A compressing vlcache server: nothing trimmed unless a request asks (alpha 1.0 by default) and
    its budget method; `+sinkN` also keeps the first N prompt tokens at every layer, `+shareS` gives
    every layer S x alpha uniform (vlcache+share0.5)."""
    method, *options = budget.split("+")
    flags = ["--vlcache-compress-ratio", "1.0", "--vlcache-compress-budget", method]
    for option in options:
        name = option.rstrip("0123456789.")
        flag, valid = _BUDGET_OPTIONS.get(name, (None, None))
        if flag is None or not valid(option[len(name):]):
            raise ValueError(f"budget {budget!r}: expected METHOD[+sinkN][+shareS] (e.g. vlcache+sink4, "
                             f"vlcache+share0.5)")
        flags += [flag, option[len(name):]]
    return launch.vlcache_flags("full") + flags


def build_servers(model: str, budgets: list[str], log_dir: str, base_port: int) -> list:
    """Stock and one compressing server per budget method on the checkpoint, real weights, small pools,
    every one decoding with SGLang's Triton kernel."""
    from tiny_vlm import serve_eval

    # Stock too: alpha 1.0 against stock then compares the same decode kernel, token for token.
    flags = serve_eval.server_flags(model, serve_eval.MAX_TOTAL_TOKENS) + launch.COMPRESSION_DECODE_FLAGS
    servers = [launch.Server("stock", flags, base_port, log_dir, mem_fraction=0.2)]
    servers += [launch.Server(b, flags + compression_server_flags(b), base_port + 1 + i, log_dir, mem_fraction=0.2)
                for i, b in enumerate(budgets)]
    return servers


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="make_eval's C.jsonl (counts) or R.jsonl (rows)")
    p.add_argument("--server", action="append", default=[], metavar="LABEL=URL",
                   help="a compressing server (--vlcache-compress-ratio 1.0) and its budget method's label")
    p.add_argument("--model", default=None, help="launch the servers on this checkpoint (with --log-dir)")
    p.add_argument("--log-dir", default=None, help="server logs (keep them out of $OUT)")
    p.add_argument("--budgets", default="vlcache,uniform,vlcache+sink4",
                   help="with --model: one compressing server each (METHOD[+sinkN][+shareS]: N sink tokens kept, "
                        "S x alpha of every layer's budget uniform)")
    p.add_argument("--base-port", type=int, default=30300)
    p.add_argument("--stock", default=None, help="URL of stock SGLang: alpha 1.0 is compared with it")
    p.add_argument("--alphas", default=",".join(map(str, ALPHAS)))
    p.add_argument("--out-dir", required=True)
    p.add_argument("--max-tokens", type=int, default=12,
                   help="a row of 8 colours is 8 tokens + <|im_end|>, four counts 7 + <|im_end|>")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--timeout-s", type=float, default=60)
    p.add_argument("--deadline-unix", type=float, default=None, help="no pass starts after this")
    args = p.parse_args(argv)
    args.alphas = sorted({float(a) for a in args.alphas.split(",") if a}, reverse=True)
    if not args.alphas or args.alphas[0] != 1.0 or not all(0 < a <= 1 for a in args.alphas):
        p.error("--alphas must hold 1.0 (the uncompressed reference) and values in (0, 1]")
    if bool(args.server) == bool(args.model) or (args.model and not args.log_dir):
        p.error("either --server LABEL=URL (servers up) or --model CKPT --log-dir DIR (launch them)")
    return args


def main(argv: Optional[list[str]] = None) -> list[dict]:
    args = parse_args(argv)
    if not args.model:
        return sweep(args)
    launch.stop_servers_on_sigterm()
    servers = build_servers(args.model, [b for b in args.budgets.split(",") if b], args.log_dir, args.base_port)
    try:
        with launch.running(servers, first_alone=True):
            args.stock = servers[0].url
            args.server = [f"{s.label}={s.url}" for s in servers[1:]]
            return sweep(args)
    finally:
        tails = "\n\n".join(f"===== {s.label}: {s.log_path}\n{launch.tail(s.log_path, 60)}" for s in servers)
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.out_dir) / "server_tails.txt").write_text(tails)


def sweep(args: argparse.Namespace) -> list[dict]:
    """Every alpha on every server (up already), the table, the JSON and the plot."""
    import time

    records = accuracy.load_dataset(args.dataset)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stock = None
    if args.stock:
        stock, _ = run_alpha(accuracy.Target("stock", args.stock.rstrip("/")), records, None, args.max_tokens,
                             args.concurrency, args.timeout_s, args.deadline_unix)
    rows, skipped = [], []
    for spec in args.server:
        target = accuracy.parse_server(spec)
        reference = None
        for alpha in args.alphas:  # 1.0 first: the reference of this server's other passes
            if args.deadline_unix is not None and time.time() > args.deadline_unix:
                skipped.append(f"{target.label} α {alpha:g}")
                continue
            results, window = run_alpha(target, records, alpha, args.max_tokens, args.concurrency, args.timeout_s,
                                        args.deadline_unix)
            reference = reference or results
            rows.append(summarise(target.label, alpha, results, reference, records, stock if alpha == 1.0 else None,
                                  window))
            print(f"{target.label} α {alpha:g}: accuracy {rows[-1]['accuracy']}, errors {rows[-1]['errors']}",
                  flush=True)
    table = table_md(rows)
    prior = accuracy.answer_prior([r.answer for r in records])
    (out_dir / "compression.json").write_text(json.dumps({"rows": rows, "skipped": skipped, "records": len(records),
                                                          "answer_prior": prior}, indent=1))
    note = f"\n\nSkipped (time budget): {', '.join(skipped)}" if skipped else ""
    note += "\n\n" + prior_line(prior, rows)
    (out_dir / "compression.md").write_text(f"# Compression accuracy, {len(records)} records\n\n{table}{note}\n")
    plot.try_plot("compression", out_dir)
    print(f"\n{table}{note}", flush=True)
    return rows


if __name__ == "__main__":
    main()
