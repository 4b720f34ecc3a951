"""Speed and capacity of VL-Cache KV compression (issue 13) on the dummy 7B, stock SGLang in the same run.

    python3 benchmarks/compression_speed.py --out-dir $OUT [--alpha 0.1] [--deadline-unix T]

Two servers, one at a time, the same backends and schedule (`--attention-backend flashinfer
--decode-attention-backend triton --disable-overlap-schedule`): stock SGLang, then vlcache with
`--vlcache-compress-ratio α` (policy full, image store off: reuse never enters). On the vlcache server
every run is made twice, at α and at α = 1.0 (uncompressed, the unchanged path) by the per-request
override `custom_params.vlcache.compress_ratio` (bench_serving's --extra-request-body), after a flush
and a warm-up, on the same requests.

1. Speed (bench_serving): 4x4K and 1080p requests, 256 output tokens (ignore_eos), concurrency 1
   and 16: TTFT, end-to-end latency, decode speed per request = 1000 / median inter-token latency,
   output throughput of the run. Prefill overhead of scoring = TTFT at α against α = 1.0.
2. Capacity: N 4x4K requests sent at once with long outputs; the peak `#running-req` of the
   server's "Decode batch" log lines (and of /metrics) at α and at 1.0, the tokens in use then and
   the KV pool (`max_total_num_tokens`).

Writes OUT/compression_speed.{json,md} (+ .png with matplotlib) and OUT/raw/ (bench JSON, server log
tails); the table is printed last. What the deadline cut is listed under "skipped".
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import http.client
import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import launch  # noqa: E402
import plot  # noqa: E402
import serving  # noqa: E402

PRESETS = ("multi-4k", "single-1080p")
C1_PROMPTS = {"multi-4k": 3, "single-1080p": 4}  # a concurrency-16 run gets 16 (serving.prompts_for)
COMPRESS_GAUGES = ("compressed_requests", "compress_freed_slots", "compress_not_captured")
# More decode log lines (SGLang's default is every 40 steps): the capacity peak is read from them.
LOG_FLAGS = ["--decode-log-interval", "10"]
# The store off (an image larger than one token is never stored): a store hit would send the prefill
# through the selective-prefill loop, which is not what this compares.
NO_STORE_FLAGS = ["--vlcache-mm-store-tokens", "1"]
DECODE_LINE = re.compile(r"Decode batch.*?#running-req: (\d+), #token: (\d+), token usage: ([\d.]+)")
QUEUE = re.compile(r"Prefill batch.*?#queue-req: (\d+)")
GRAPH_FLAG = re.compile(r"Decode batch.*?cuda graph: (True|False)")


# ----- servers and variants ---------------------------------------------------------------------

def stock_flags(base: list[str]) -> list[str]:
    return base + launch.COMPRESSION_DECODE_FLAGS + LOG_FLAGS


def stock_default_flags(base: list[str]) -> list[str]:
    """Stock as a user runs it: SGLang's default decode backend and overlap scheduling."""
    return base + LOG_FLAGS


STOCK_DEFAULT = "stock-default-decode"


def compress_flags(base: list[str], alpha: float) -> list[str]:
    return (stock_flags(base) + launch.vlcache_flags("full") + ["--vlcache-compress-ratio", f"{alpha:g}"]
            + NO_STORE_FLAGS)


def override(alpha: float) -> dict:
    """The request body part that sets this request's α (policy full: no reuse)."""
    return {"custom_params": {"vlcache": {"policy": "full", "compress_ratio": alpha}}}


def variant_label(alpha: float) -> str:
    return f"vlcache α={alpha:g}"


# ----- capacity ---------------------------------------------------------------------------------

def log_peak(text: str) -> dict:
    """Peak `#running-req` of the "Decode batch" lines of a server log excerpt, the tokens in use
    and the usage of that line (the first line at the peak with most tokens), the most requests
    any "Prefill batch" line saw waiting."""
    lines = [(int(n), int(t), float(u)) for n, t, u in DECODE_LINE.findall(text)]
    queues = [int(q) for q in QUEUE.findall(text)]
    if not lines:
        return {"peak_running": None, "tokens_at_peak": None, "usage_at_peak": None, "decode_lines": 0,
                "peak_queue": max(queues, default=None)}
    peak = max(n for n, _, _ in lines)
    tokens, usage = max((t, u) for n, t, u in lines if n == peak)
    return {"peak_running": peak, "tokens_at_peak": tokens, "usage_at_peak": usage, "decode_lines": len(lines),
            "peak_queue": max(queues, default=None)}


def decode_graph_share(text: str) -> dict:
    """How many logged decode batches replayed a CUDA graph: the speed of a trimmed batch depends on
    it (an eager 7B decode step is launch-bound), and a silent fall to eager is what to catch."""
    flags = GRAPH_FLAG.findall(text)
    return {"decode_batches_logged": len(flags), "decode_batches_in_graph": flags.count("True")}


def running_now(url: str) -> tuple[Optional[float], Optional[float]]:
    """(running, waiting) requests of SGLang's /metrics gauges (updated at each log line)."""
    status, body = launch.http_get(url + "/metrics")
    g = launch.parse_gauges(body, "sglang:") if status == 200 else {}
    return g.get("num_running_reqs"), g.get("num_queue_reqs")


def watch_running(poll: Callable[[], tuple[Optional[float], Optional[float]]], target: int, settle_s: float,
                  timeout_s: float, poll_s: float = 0.5, clock: Callable[[], float] = time.monotonic,
                  sleep: Callable[[float], None] = time.sleep) -> dict:
    """Poll until every request runs (peak == target), or requests wait while the running count has
    not grown for settle_s (the pool is full), or timeout_s. The peak seen and why it stopped."""
    t0 = clock()
    peak, grew_at = 0.0, t0
    while True:
        running, queued = poll()
        now = clock()
        if running is not None and running > peak:
            peak, grew_at = running, now
        if peak >= target:
            return {"peak_running_metrics": int(peak), "stopped": "all running", "watch_s": round(now - t0, 1)}
        if queued and peak > 0 and now - grew_at >= settle_s:
            return {"peak_running_metrics": int(peak), "stopped": f"no growth for {settle_s:g} s, {queued:g} waiting",
                    "watch_s": round(now - t0, 1)}
        if now - t0 >= timeout_s:
            return {"peak_running_metrics": int(peak), "stopped": f"timeout {timeout_s:g} s",
                    "watch_s": round(now - t0, 1)}
        sleep(poll_s)


def capacity_body(row: dict, output_len: int, extra: dict) -> dict:
    return {**row, "max_tokens": output_len, "temperature": 0, **extra}


def send_all(url: str, bodies: list[dict], timeout_s: float) -> tuple[list, threading.Thread]:
    """Every body at once in background threads (stream_chat; an aborted stream is an outcome, not
    an error here). Returns the outcome list (filled as they end) and the thread that joins them."""
    outcomes: list = []

    def one(body: dict) -> None:
        try:
            outcomes.append(serving.stream_chat(url, body, timeout_s=timeout_s))
        except (RuntimeError, OSError, http.client.HTTPException, ValueError) as e:
            outcomes.append({"error": f"{type(e).__name__}: {str(e)[:200]}"})

    def run() -> None:
        with ThreadPoolExecutor(len(bodies)) as pool:
            list(pool.map(one, bodies))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return outcomes, t


def wait_flushed(url: str, timeout_s: float = 60, poll_s: float = 1.0) -> bool:
    """Flush until SGLang accepts (it refuses while requests run: after an abort they drain)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if serving.post(url, "/flush_cache") == 200:
            return True
        time.sleep(poll_s)
    return False


def log_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def measure_capacity(srv: launch.Server, rows: list[dict], alpha: float, output_len: int, settle_s: float,
                     timeout_s: float) -> dict:
    """All rows at once at α; stop when the pool is full (or all run), abort every request, read
    the peak from the log lines written meanwhile."""
    if not wait_flushed(srv.url):
        raise RuntimeError(f"{srv.label}: /flush_cache refused for 60 s")
    start, before = log_size(srv.log_path), srv.metrics()
    t0 = time.monotonic()
    outcomes, sender = send_all(srv.url, [capacity_body(r, output_len, override(alpha)) for r in rows],
                                timeout_s + 120)
    watched = watch_running(lambda: running_now(srv.url), len(rows), settle_s, timeout_s)
    time.sleep(1.0)  # one more decode log line at the peak
    serving.post(srv.url, "/abort_request", {"abort_all": True})
    sender.join(timeout=60)
    drained = wait_flushed(srv.url)
    with open(srv.log_path, "rb") as f:
        f.seek(start)
        excerpt = f.read().decode(errors="replace")
    after = srv.metrics()
    return {"alpha": alpha, "sent": len(rows), "output_len": output_len, **log_peak(excerpt), **watched,
            "elapsed_s": round(time.monotonic() - t0, 1), "drained": drained,
            "client_errors": sum(1 for o in outcomes if "error" in o),
            **{k: after.get(k, 0.0) - before.get(k, 0.0) for k in COMPRESS_GAUGES}}


def capacity_estimate(row: dict, pool: Optional[int]) -> Optional[float]:
    """The pool over the tokens one running request held at the peak (its kept prompt plus what it
    generated by then): how many would fit if SGLang kept no room back for their remaining output."""
    if not pool or not row.get("peak_running") or not row.get("tokens_at_peak"):
        return None
    return pool / (row["tokens_at_peak"] / row["peak_running"])


# ----- report -----------------------------------------------------------------------------------

def decode_tok_per_s(row: dict) -> Optional[float]:
    itl = row.get("itl_p50_ms")
    return 1000.0 / itl if itl else None


def add_ratios(rows: list[dict], reference: str) -> None:
    """Per row: decode speed, and E2E / decode / TTFT against the reference server at the same
    preset and concurrency (α = 1.0 on the same server)."""
    ok = [r for r in rows if "error" not in r]
    for r in ok:
        r["decode_tok_per_s"] = decode_tok_per_s(r)
    ref = {(r["preset"], r["concurrency"]): r for r in ok if r["server"] == reference}
    for r in ok:
        base = ref.get((r["preset"], r["concurrency"]))
        r["e2e_speedup_vs_uncompressed"] = _ratio(base and base.get("e2e_p50_ms"), r.get("e2e_p50_ms"))
        r["decode_speedup_vs_uncompressed"] = _ratio(r.get("decode_tok_per_s"), base and base.get("decode_tok_per_s"))
        r["ttft_overhead_ms"] = (r["ttft_p50_ms"] - base["ttft_p50_ms"]
                                 if base and r.get("ttft_p50_ms") is not None and base.get("ttft_p50_ms") is not None
                                 else None)


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a and b else None


def _x(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:.2f}×"


def speed_table(rows: list[dict]) -> str:
    f = serving.fmt
    head = ("| preset | conc | server | TTFT p50 ms | E2E p50 ms | ITL p50 ms | decode tok/s per request | "
            "TPOT p50 ms | output tok/s (run) | done | E2E speed-up vs α=1 | decode speed-up vs α=1 | "
            "TTFT − α=1 ms |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        if "error" in r:
            lines.append(serving.failed_row([r["preset"], r["concurrency"], r["server"]], r["error"], 9))
            continue
        lines.append(
            f"| {r['preset']} | {r['concurrency']} | {r['server']} | {f(r['ttft_p50_ms'], '.0f')} | "
            f"{f(r['e2e_p50_ms'], '.0f')} | {f(r.get('itl_p50_ms'), '.2f')} | {f(r.get('decode_tok_per_s'), '.1f')} | "
            f"{f(r.get('tpot_p50_ms'), '.2f')} | {f(r['output_tok_per_s'], '.0f')} | {r['completed']}/{r['num_prompts']} | "
            f"{_x(r.get('e2e_speedup_vs_uncompressed'))} | {_x(r.get('decode_speedup_vs_uncompressed'))} | "
            f"{f(r.get('ttft_overhead_ms'), '+.0f')} |")
    return "\n".join(lines)


def capacity_table(rows: list[dict], pool: Optional[int]) -> str:
    f = serving.fmt
    head = ("| α | sent | peak #running-req (log) | peak (metrics) | #token at peak | tokens per request | "
            "KV pool | pool ÷ tokens per request | stopped | compressed | freed slots |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['alpha']:g} | failed: {r['error'].splitlines()[0][:80]} |" + " |" * 9)
            continue
        per = r["tokens_at_peak"] / r["peak_running"] if r.get("peak_running") and r.get("tokens_at_peak") else None
        peak = r.get("peak_running")
        shown = f"{peak} (all sent: ≥)" if peak is not None and peak >= r["sent"] else f(peak, "d")
        lines.append(f"| {r['alpha']:g} | {r['sent']} | {shown} | {f(r.get('peak_running_metrics'), 'd')} | "
                     f"{f(r.get('tokens_at_peak'), 'd')} | {f(per, '.0f')} | {f(pool, 'd')} | "
                     f"{f(capacity_estimate(r, pool), '.0f')} | {r['stopped']} | "
                     f"{f(r.get('compressed_requests'), '.0f')} | {f(r.get('compress_freed_slots'), '.0f')} |")
    return "\n".join(lines)


NOTES = ("Decode tok/s per request = 1000 / the median inter-token latency (bench_serving's ITL: one "
         "streamed chunk per token); output tok/s (run) = all generated tokens over the run's wall time "
         "(prefills included). E2E and decode speed-up: against α = 1.0 on the same server (uncompressed, "
         "SGLang's own path); TTFT − α=1 is the prefill overhead of scoring and trimming (the trim runs "
         "before the first token is sent). Decode replays CUDA graphs up to `--cuda-graph-max-bs` (8 unless "
         "the extra flags above raise it), "
         "trimmed batches too (per-layer tables; eager only past the buffers' capacity, counted as "
         "`compress_graph_fallbacks`); the server line says how many logged decode batches did. The "
         "vlcache server's tokenizer-side processed-pixel cache (on, as served) skips image decoding for "
         "images it has seen, so its TTFT is not stock's; α against α = 1.0 is the comparison. Capacity: "
         "the peak of the server's \"Decode batch\" `#running-req` while the requests were sent at once "
         "(SGLang admits a request when its prompt and a reserve for the running requests' remaining "
         "output fit); `pool ÷ tokens per request` is what the pool would hold at the tokens one running "
         "request held at the peak, without that reserve.")


def report_md(meta: dict, speed: list[dict], capacity: list[dict]) -> str:
    pool = meta["servers"].get(meta.get("compress_label", ""), {}).get("kv_pool_tokens")
    out = [f"# Compression speed and capacity, {meta['gpu']}, {meta['date']}", "",
           f"Model `{meta['model_path']}` ({meta['load_format']} weights), sglang {meta['sglang_version']}, "
           f"`--mem-fraction-static {meta['mem_fraction']}`, α = {meta['alpha']:g}, {meta['output_len']} output "
           f"tokens (ignore_eos), one server at a time. Wall time: {meta.get('elapsed_s', '?')} s."
           + (f" Every server also: `{' '.join(meta['extra_server_flags'])}`." if meta.get("extra_server_flags") else ""),
           "",
           *([meta["gpu_busy"], ""] if meta.get("gpu_busy") else [])]
    for label, s in meta["servers"].items():
        state = f"error: {serving._first_last(s['error'])}" if s.get("error") else \
            f"healthy after {s.get('startup_s') or 0:.0f} s, KV pool {s.get('kv_pool_tokens')} tokens"
        if s.get("decode_batches_logged"):
            state += f", decode batches in a CUDA graph {s['decode_batches_in_graph']} of {s['decode_batches_logged']} logged"
        out.append(f"- `{label}` (`{' '.join(s['flags'])}`): {state}")
    out += ["", "Prompts per run: " + ", ".join(f"{p} {c}" for p, c in meta["prompts"].items()), "",
            "## Speed", "", speed_table(speed), "", "## Capacity (4×4K)", "", capacity_table(capacity, pool), "",
            NOTES, ""]
    if meta.get("skipped"):
        out += [f"**Skipped (time budget):** {', '.join(meta['skipped'])}", ""]
    return "\n".join(out)


@dataclasses.dataclass
class SpeedResults(serving.Results):
    """serving.Results with the capacity rows, written as compression_speed.{json,md}."""
    capacity: list[dict] = dataclasses.field(default_factory=list)

    def save(self) -> None:
        serving.order_rows(self.rows)
        add_ratios(self.rows, variant_label(1.0))
        (self.run_dir / "raw").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "compression_speed.json").write_text(
            json.dumps({"meta": self.meta, "speed": self.rows, "capacity": self.capacity}, indent=1))
        (self.run_dir / "compression_speed.md").write_text(report_md(self.meta, self.rows, self.capacity))
        (self.run_dir / "raw" / "compression_speed.raw.json").write_text(json.dumps(self.raw))


# ----- main -------------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", required=True)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--capacity-requests", type=int, default=40, help="4x4K requests sent at once (0: no capacity)")
    p.add_argument("--capacity-output-len", type=int, default=512, help="long enough to be running when the last is admitted")
    p.add_argument("--capacity-settle-s", type=float, default=8.0, help="no new running request for this long: full")
    p.add_argument("--capacity-timeout-s", type=float, default=60.0)
    p.add_argument("--no-stock", action="store_true")
    p.add_argument("--stock-default-decode", action="store_true",
                   help="also stock SGLang with its own decode backend (FlashInfer) and overlap scheduling: "
                        "the uncompressed speed a user gets without the backends compression needs")
    p.add_argument("--model-path", default="/tmp/Qwen2.5-VL-7B-Instruct")
    p.add_argument("--mem-fraction", type=float, default=0.7)
    p.add_argument("--server-flags", action="append", default=[],
                   help="more SGLang flags for every server (repeatable: SPEED_ARGS cannot quote spaces)")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--server-timeout", type=float, default=300)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--work-dir", default="/tmp/vlcache_cspeed")
    p.add_argument("--deadline-unix", type=float, default=None, help="no phase starts after this")
    args = p.parse_args(argv)
    if not 0 < args.alpha < 1:
        p.error("--alpha must be in (0, 1): 1.0 is the uncompressed reference every run is compared with")
    return args


def time_left(args: argparse.Namespace) -> float:
    return float("inf") if args.deadline_unix is None else args.deadline_unix - time.time()


def build_works(args: argparse.Namespace, work_dir: Path) -> list[serving.PresetWork]:
    """One workload per preset; multi-4k's spare rows (build_workload's probe slice: new text, the
    same image pool) are the capacity requests."""
    works = []
    for preset in args.presets:
        spare = args.capacity_requests if preset == "multi-4k" else 0
        works.append(serving.build_workload(preset, args.concurrency, C1_PROMPTS[preset], spare, args.seed,
                                            work_dir, output_len=args.output_len))
        print(f"workload {preset}: {works[-1].counts} prompts per concurrency, {spare} capacity rows", flush=True)
    return works


def run_compressing(srv: launch.Server, works: list[serving.PresetWork], work_dir: Path, results: SpeedResults,
                    args: argparse.Namespace) -> None:
    """Per preset the α pass then the α = 1.0 pass (a deadline cut leaves pairs), capacity after
    the 4x4K pair."""
    stop_at = args.deadline_unix
    for work in works:
        for alpha in (args.alpha, 1.0):
            label = variant_label(alpha)
            if time_left(args) < 30:
                results.meta["skipped"].append(f"{label}/{work.preset}")
                continue
            results.meta["skipped"] += serving.measure_server(srv, [work], work_dir, results, override(alpha),
                                                              label, probe=False, stop_at=stop_at)
        if work.preset == "multi-4k" and args.capacity_requests:
            run_capacity(srv, work.probes, results, args)


def run_capacity(srv: launch.Server, rows: list[dict], results: SpeedResults, args: argparse.Namespace) -> None:
    for alpha in (args.alpha, 1.0):
        if time_left(args) < args.capacity_timeout_s + 45:
            results.meta["skipped"].append(f"capacity α={alpha:g}")
            continue
        try:
            row = measure_capacity(srv, rows, alpha, args.capacity_output_len, args.capacity_settle_s,
                                   args.capacity_timeout_s)
        except (RuntimeError, OSError, http.client.HTTPException) as e:
            row = {"alpha": alpha, "sent": len(rows), "error": f"{type(e).__name__}: {e}"}
        results.capacity.append(row)
        results.save()
        print(f"  capacity α={alpha:g}: peak running {row.get('peak_running')} of {len(rows)} "
              f"({row.get('stopped', row.get('error'))})", flush=True)


def main(argv: Optional[list[str]] = None) -> Path:
    args = parse_args(argv)
    launch.stop_servers_on_sigterm()
    t_start = time.monotonic()
    run_dir, work_dir = Path(args.out_dir), Path(args.work_dir)
    shutil.rmtree(work_dir, ignore_errors=True)
    (work_dir / "logs").mkdir(parents=True)
    works = build_works(args, work_dir)
    extra = [f for flags in args.server_flags for f in shlex.split(flags)]
    base = launch.base_flags(args.model_path) + extra
    compress_label = f"vlcache-compress-{args.alpha:g}"
    # The compressing server first: the first start on a fresh machine is the slow one (~170 s against
    # ~70 s), and a deadline cut should leave the stock runs out, not the subject of the comparison.
    servers_todo = [(compress_label, compress_flags(base, args.alpha))] + \
        ([] if args.no_stock else [("stock", stock_flags(base))]) + \
        ([(STOCK_DEFAULT, stock_default_flags(base))] if args.stock_default_decode else [])
    meta = {"date": datetime.date.today().isoformat(), "gpu": serving.gpu_name(), "model_path": args.model_path,
            "load_format": "dummy", "sglang_version": serving._sglang_version(), "mem_fraction": args.mem_fraction,
            "alpha": args.alpha, "output_len": args.output_len, "compress_label": compress_label,
            "extra_server_flags": extra,
            "prompts": {w.preset: w.counts for w in works}, "servers": {}, "skipped": [],
            "gpu_busy": serving.busy_gpu_warning(serving.gpu_memory_used_mib())}
    results = SpeedResults(run_dir, meta)
    started = []
    for i, (label, flags) in enumerate(servers_todo):
        meta["servers"][label] = {"flags": flags[len(base):]}
        if time_left(args) < 120:  # a start alone takes 60-150 s on the GPU host
            meta["skipped"].append(f"server {label}")
            continue
        srv = serving.make_server(label, flags, args.port + i, work_dir / "logs", args)
        started.append(srv)
        try:
            with srv:
                meta["servers"][label].update(startup_s=srv.startup_s,
                                              kv_pool_tokens=serving.kv_pool_tokens(srv.server_info()))
                if label in ("stock", STOCK_DEFAULT):
                    meta["skipped"] += serving.measure_server(srv, works, work_dir, results, probe=False,
                                                              stop_at=args.deadline_unix)
                else:
                    run_compressing(srv, works, work_dir, results, args)
        except (RuntimeError, OSError, http.client.HTTPException, subprocess.TimeoutExpired) as e:
            meta["servers"][label]["error"] = f"{type(e).__name__}: {e}"
            print(f"server {label}: {e}", flush=True)
        if srv.log_path.exists():
            meta["servers"][label].update(decode_graph_share(srv.log_path.read_text(errors="replace")))
        results.save()
        serving.write_log_tails(run_dir, started)
        print(f"server {label} done at {time.monotonic() - t_start:.0f} s", flush=True)
    meta["elapsed_s"] = round(time.monotonic() - t_start)
    results.save()
    plot.try_plot("compression_speed", run_dir)
    pool = meta["servers"].get(compress_label, {}).get("kv_pool_tokens")
    print(f"\nresults in {run_dir}\n\n{speed_table(results.rows)}\n\n{capacity_table(results.capacity, pool)}")
    if meta["skipped"]:
        print(f"\nskipped (time budget): {', '.join(meta['skipped'])}")
    return run_dir


if __name__ == "__main__":
    main()
