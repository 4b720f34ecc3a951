"""Serving benchmark, stock SGLang vs vlcache policies on recurring-image workloads, one GPU, one run.

    python3 benchmarks/serving.py --quick                       # ~4-5 min: single-1080p, stock + first_k
    python3 benchmarks/serving.py --presets single-1080p multi-4k --policies none first_k

Per server (one at a time) and preset: flush, warm up (every pool image once, after text no measured
request has), then `python -m sglang.bench_serving` at each concurrency on requests whose text is new
to the server, then the exact-prefix-hit probe (one request sent twice). Writes
RESULTS/<date>-<gpu>/serving.{json,md} (+ serving.png with matplotlib) and raw/ (bench JSON, server
log tails; git-ignored), and prints the table last.
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
import statistics
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import launch  # noqa: E402
from accuracy_report import fmt  # noqa: E402  (one table-cell formatter)
import plot  # noqa: E402
import workloads  # noqa: E402

QUICK = dict(presets=["single-1080p"], policies=["first_k"], num_prompts=16, probes=3)
FULL = dict(presets=["single-1080p", "multi-4k"], policies=["none", "first_k"], num_prompts=None, probes=5)
FULL_PROMPTS = {"multi-4k": 16}  # 4x4K requests are ~42k tokens each; other presets default to 48
WARM = ("warm = after start-up (CUDA graphs captured) and a cache flush, the server has served one "
        "request per distinct pool image (that image alone, after text no measured request has), then "
        "the first of them once more after other text (our server's CUDA graphs are captured there); "
        "bench_serving's own warm-up is off (--warmup-requests 0: it would send the first measured "
        "request early and make it an exact-prefix hit). Measured requests: new text, seen images.")


# ----- workload ---------------------------------------------------------------------------------

@dataclasses.dataclass
class PresetWork:
    preset: str
    files: dict[int, Path]  # concurrency -> bench_serving JSONL of that run's requests
    counts: dict[int, int]
    warmup: list[dict]  # one request per distinct image
    probes: list[dict]  # requests for the exact-prefix-hit probe


def prompts_for(concurrency: int, num_prompts: int) -> int:
    """A run at concurrency c fills every slot at least once (4x4K stock requests take seconds each:
    more waves would not fit the GPU host's 10-minute command limit)."""
    return max(num_prompts, concurrency)


def image_urls(row: dict) -> list[str]:
    return [c["image_url"]["url"] for m in row["messages"] if isinstance(m["content"], list)
            for c in m["content"] if c.get("type") == "image_url"]


def warmup_requests(rows: list[dict], max_tokens: int = 1) -> list[dict]:
    """One request per distinct image of rows, the image alone after a text no workload row has,
    then the first image once more after another such text (our server's first reuse: it captures
    its CUDA graphs of the selective prefill there, not in a measured request)."""
    urls = list(dict.fromkeys(url for row in rows for url in image_urls(row)))
    pairs = [(f"Warm-up {i}: the image is", url) for i, url in enumerate(urls)]
    pairs += [("Warm-up, once more: the image is", url) for url in urls[:1]]
    return [{"messages": [{"role": "user", "content": [
        {"type": "text", "text": text},
        {"type": "image_url", "image_url": {"url": url}}]}],
        "max_tokens": max_tokens, "temperature": 0} for text, url in pairs]


def build_workload(preset: str, concurrencies: list[int], num_prompts: int, probes: int, seed: int,
                   work_dir: Path, size_override: Optional[tuple[int, int]] = None,
                   output_len: Optional[int] = None) -> PresetWork:
    """One generated workload split into disjoint slices (one per concurrency, then the probes), so
    no measured request repeats another's text; all share the preset's image pool. output_len: the
    requests' max_tokens instead of the preset's."""
    counts = {c: prompts_for(c, num_prompts) for c in concurrencies}
    spec = dataclasses.replace(workloads.PRESETS[preset], num_requests=sum(counts.values()) + probes, seed=seed)
    if output_len is not None:
        spec = dataclasses.replace(spec, output_len=output_len)
    rows = list(workloads.generate(spec, size_override=size_override))
    work_dir.mkdir(parents=True, exist_ok=True)
    files, start = {}, 0
    for c, n in counts.items():
        files[c] = work_dir / f"{preset}_c{c}.jsonl"
        with open(files[c], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows[start:start + n])
        start += n
    return PresetWork(preset, files, counts, warmup_requests(rows), rows[start:])


# ----- requests ---------------------------------------------------------------------------------

def stream_chat(url: str, body: dict, timeout_s: float = 180, headers: Optional[dict] = None) -> dict:
    """One streaming chat completion (`headers`: more request headers, e.g. a routing key). ttft_ms: the first chunk with a choice (SGLang sends the role
    chunk as the first token comes out); content_ttft_ms: the first non-empty content, bench_serving's
    definition, one decode step later when the first token is part of a multi-byte character.
    Prompt and cached tokens from the usage chunk."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    payload = {"ignore_eos": True, **body, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = content = None
    usage: dict = {}
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(payload),
                     {"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"POST {url}/v1/chat/completions: {resp.status} {resp.read()[:300]!r}")
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            usage = chunk.get("usage") or usage
            if chunk.get("error") or chunk.get("object") == "error":
                raise RuntimeError(f"{url}: error in stream: {line[:300]}")
            choices = chunk.get("choices") or []
            if not choices:
                continue
            now = time.perf_counter() - t0
            first = now if first is None else first
            delta = choices[0].get("delta") or {}
            if content is None and (delta.get("content") or delta.get("reasoning_content")):
                content = now
    finally:
        conn.close()
    details = usage.get("prompt_tokens_details") or {}
    return {"ttft_ms": _ms(first), "content_ttft_ms": _ms(content), "prompt_tokens": usage.get("prompt_tokens"),
            "cached_tokens": details.get("cached_tokens")}


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else seconds * 1000


def prefix_hit_probe(url: str, probes: list[dict]) -> dict:
    """Each probe request twice in a row: the first has new text (seen images), the second is an
    exact-prefix hit. Medians of both TTFTs."""
    pairs = [(stream_chat(url, row), stream_chat(url, row)) for row in probes]
    if any(p["ttft_ms"] is None for pair in pairs for p in pair):
        raise RuntimeError(f"{url}: a probe stream carried no choice: {pairs}")
    return {"new_text_ttft_ms": _median([a["ttft_ms"] for a, _ in pairs]),
            "prefix_hit_ttft_ms": _median([b["ttft_ms"] for _, b in pairs]),
            "pairs": [{"first": a, "second": b} for a, b in pairs]}


def _median(xs: list[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


def post(url: str, path: str, body: Optional[dict] = None, timeout_s: float = 60) -> int:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    try:
        conn.request("POST", path, json.dumps(body or {}), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


# ----- bench_serving ----------------------------------------------------------------------------

def bench_command(url: str, dataset: Path, num_prompts: int, concurrency: int, output_file: Path,
                  extra_body: Optional[dict] = None) -> list[str]:
    """bench_serving on a JSONL of chat requests (ignore_eos is its default: every request generates
    its max_tokens). extra_body: merged into every request's payload (--extra-request-body), e.g. a
    per-request `custom_params` override."""
    cmd = [sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang-oai-chat",
           "--base-url", url, "--dataset-name", "openai", "--dataset-path", str(dataset),
           "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
           "--request-rate", "inf", "--warmup-requests", "0", "--cache-report", "--output-details",
           "--disable-tqdm", "--output-file", str(output_file)]
    return cmd + (["--extra-request-body", json.dumps(extra_body)] if extra_body else [])


def run_bench(cmd: list[str], output_file: Path, log_file: Path, timeout_s: float = 300) -> dict:
    """Run bench_serving; its result is the last line it appended to output_file."""
    output_file.unlink(missing_ok=True)
    with open(log_file, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
    if proc.returncode != 0 or not output_file.exists():
        raise RuntimeError(f"bench_serving exited {proc.returncode}; {log_file} ends:\n{launch.tail(log_file, 15)}")
    return json.loads(output_file.read_text().strip().splitlines()[-1])


def summarise(bench: dict, window: dict[str, float], num_prompts: int) -> dict:
    """The table's numbers of one bench_serving run plus the vlcache gauges over its window."""
    return {
        "num_prompts": num_prompts, "completed": bench.get("completed"),
        "ttft_p50_ms": bench.get("median_ttft_ms"), "ttft_p90_ms": bench.get("p90_ttft_ms"),
        "e2e_p50_ms": bench.get("median_e2e_latency_ms"), "req_per_s": bench.get("request_throughput"),
        "output_tok_per_s": bench.get("output_throughput"), "duration_s": bench.get("duration"),
        "itl_p50_ms": bench.get("median_itl_ms"), "tpot_p50_ms": bench.get("median_tpot_ms"),
        "first_error": next((e for e in bench.get("errors") or [] if e), None),
        **window,
    }


def add_speedups(rows: list[dict]) -> None:
    """TTFT p50 speed-up of each row vs stock at the same preset and concurrency."""
    stock = {(r["preset"], r["concurrency"]): r.get("ttft_p50_ms") for r in rows if r["server"] == "stock"}
    for r in rows:
        base, own = stock.get((r["preset"], r["concurrency"])), r.get("ttft_p50_ms")
        r["ttft_speedup_vs_stock"] = base / own if base and own else None


# ----- one server -------------------------------------------------------------------------------

def server_label(policy: str) -> str:
    return "stock" if policy == "stock" else f"vlcache-{policy}"


def kv_pool_tokens(info: dict) -> Optional[int]:
    """max_total_num_tokens of /server_info (top level in 0.5.16; per-DP internal_states otherwise)."""
    if "max_total_num_tokens" in info:
        return info["max_total_num_tokens"]
    for state in info.get("internal_states") or []:
        if "max_total_num_tokens" in state:
            return state["max_total_num_tokens"]
    return None


@dataclasses.dataclass
class Results:
    """What the run measured so far, rewritten to disk after every change: a run cut short by the
    GPU host's time limit still leaves its tables."""
    run_dir: Path
    meta: dict
    rows: list[dict] = dataclasses.field(default_factory=list)
    raw: dict = dataclasses.field(default_factory=dict)

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        self.save()
        return row

    def save(self) -> None:
        write_results(self.run_dir, self.meta, self.rows, self.raw)


def measure_server(srv: launch.Server, works: list[PresetWork], work_dir: Path, results: Results,
                   extra_body: Optional[dict] = None, label: Optional[str] = None, probe: bool = True,
                   stop_at: Optional[float] = None) -> list[str]:
    """All presets and concurrencies on one running server. extra_body: merged into every request
    (warm-up included), e.g. a per-request override; label: the rows' server name (default the
    server's); probe: run the exact-prefix-hit probe; stop_at (time.time()): no bench run starts
    after it. Returns the keys of the runs skipped for stop_at."""
    label = label or srv.label
    skipped: list[str] = []
    for work in works:
        if post(srv.url, "/flush_cache") != 200:
            raise RuntimeError(f"{label}: /flush_cache refused")
        t0 = time.monotonic()
        for body in work.warmup:
            stream_chat(srv.url, {**body, **(extra_body or {})})
        print(f"  {label} {work.preset}: warm-up {len(work.warmup)} requests {time.monotonic() - t0:.0f} s",
              flush=True)
        rows = []
        for conc, path in work.files.items():
            key = f"{label}/{work.preset}/c{conc}"
            if stop_at is not None and time.time() > stop_at:
                skipped.append(key)
                continue
            base = {"preset": work.preset, "server": label, "concurrency": conc}
            before = srv.metrics()
            out = work_dir / "bench.jsonl"
            try:
                bench = run_bench(bench_command(srv.url, path, work.counts[conc], conc, out, extra_body), out,
                                  work_dir / f"bench_{slug(key)}.log")
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                results.add({**base, "error": str(e)[-2000:]})
                print(f"  {key}: {e}", flush=True)
                continue
            results.raw[key] = bench
            rows.append(results.add({**base, **summarise(bench, launch.gauge_deltas(before, srv.metrics()),
                                                         work.counts[conc])}))
            print(f"  {key}: TTFT p50 {fmt(rows[-1]['ttft_p50_ms'], '.0f')} ms, "
                  f"{fmt(rows[-1]['req_per_s'], '.2f')} req/s", flush=True)
        if probe:
            run_probe(srv.url, label, work, rows, results)
        results.save()
    return skipped


def run_probe(url: str, label: str, work: PresetWork, rows: list[dict], results: Results) -> None:
    """The exact-prefix-hit probe of one preset; its medians go into that preset's rows."""
    try:
        found = prefix_hit_probe(url, work.probes)
    except (RuntimeError, OSError, http.client.HTTPException) as e:
        found = {"error": f"{type(e).__name__}: {e}", "prefix_hit_ttft_ms": None, "new_text_ttft_ms": None}
        print(f"  {label} {work.preset}: prefix-hit probe failed: {e}", flush=True)
    results.raw[f"{label}/{work.preset}/prefix_probe"] = found
    for row in rows:
        row.update(prefix_hit_ttft_ms=found["prefix_hit_ttft_ms"], new_text_ttft_ms=found["new_text_ttft_ms"])


# ----- results ----------------------------------------------------------------------------------

def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:  # no nvidia-smi: ask torch (slower to import)
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return "no-gpu"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def failed_row(cells: list, error: str, blanks: int) -> str:
    """A table row for a run that failed: its key cells, the error's first line, then empty cells."""
    return "| " + " | ".join(map(str, cells)) + f" | failed: {error.splitlines()[0][:80]} |" + " |" * blanks


def table_md(rows: list[dict]) -> str:
    head = ("| preset | server | conc | TTFT p50 ms | TTFT p90 ms | E2E p50 ms | req/s | out tok/s | "
            "TTFT p50 speed-up | prefix-hit TTFT ms | hit rate | recomputed | store tokens |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        if "error" in r:
            lines.append(failed_row([r["preset"], r["server"], r["concurrency"]], r["error"], 9))
            continue
        speed = r.get("ttft_speedup_vs_stock")
        lines.append(
            f"| {r['preset']} | {r['server']} | {r['concurrency']} | {fmt(r['ttft_p50_ms'], '.0f')} | "
            f"{fmt(r['ttft_p90_ms'], '.0f')} | {fmt(r['e2e_p50_ms'], '.0f')} | {fmt(r['req_per_s'], '.2f')} | "
            f"{fmt(r['output_tok_per_s'], '.0f')} | {'–' if speed is None else f'{speed:.2f}×'} | "
            f"{fmt(r.get('prefix_hit_ttft_ms'), '.1f')} | {fmt(r.get('hit_rate'), '.2f')} | "
            f"{fmt(r.get('recomputed_fraction'), '.3f')} | {fmt(r.get('store_tokens'), '.0f')} |")
    failed = [r for r in rows if "error" not in r and r.get("completed") != r.get("num_prompts")]
    for r in failed:  # their latency numbers cover the successful requests only
        error = (r.get("first_error") or "?").strip().splitlines()
        lines.append(f"\n**{r['preset']} / {r['server']} / conc {r['concurrency']}: {r.get('completed')} of "
                     f"{r['num_prompts']} requests succeeded**; first error: `{(error[-1] if error else '?')[:200]}`")
    return "\n".join(lines)


# More than this in use before our first server starts means another process (a server left by an
# earlier, killed run) shares the GPU: its memory shrinks our KV pools and its work skews TTFT.
BUSY_GPU_MIB = 2048


def gpu_memory_used_mib() -> Optional[int]:
    """Memory in use on GPU 0 (nvidia-smi), None where it cannot tell."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = out.stdout.strip().splitlines()[:1]
    return int(float(first[0])) if out.returncode == 0 and first and first[0].strip() else None


def busy_gpu_warning(used_mib: Optional[int]) -> Optional[str]:
    if used_mib is None or used_mib <= BUSY_GPU_MIB:
        return None
    return (f"WARNING: {used_mib} MiB of GPU memory were in use before the first server started: another "
            f"process shares the GPU, so KV pools are smaller and TTFTs are not clean measurements.")


def report_md(meta: dict, rows: list[dict]) -> str:
    out = [f"# Serving: stock SGLang vs vlcache, {meta['gpu']}, {meta['date']}", "",
           f"Model `{meta['model_path']}` ({meta['load_format']} weights), sglang {meta['sglang_version']}, "
           f"`--mem-fraction-static {meta['mem_fraction']}`, one server at a time. Request rate inf; "
           f"concurrency caps the requests in flight; outputs are {'/'.join(map(str, meta['output_tokens']))} "
           f"tokens (TTFT-bound). Wall time of the whole run: {meta.get('elapsed_s', '?')} s"
           + (f" ({len(meta['merged_from'])} runs merged)." if meta.get("merged_from") else "."),
           "", *([meta["gpu_busy"], ""] if meta.get("gpu_busy") else []), WARM, "",
           "TTFT p50 speed-up: stock's p50 / this server's at the same preset and concurrency. Prefix-hit "
           "TTFT: median over a few workload requests each sent twice, the second one's TTFT (an exact "
           "prefix hit). Hit rate, recomputed fraction: vlcache gauges over the measured run (images found "
           "in the store / looked up; reused image tokens computed per layer, averaged over layers). Store tokens: KV tokens held by "
           "image nodes after the run.", ""]
    for label, s in meta["servers"].items():
        state = f"error: {_first_last(s['error'])}" if s.get("error") else \
            f"healthy after {s['startup_s']:.0f} s, KV pool {s['kv_pool_tokens']} tokens"
        out.append(f"- `{label}`: {state}")
    out += ["", "Prompts per run: " + ", ".join(f"{p} {c}" for p, c in meta["prompts"].items()), "",
            table_md(rows), ""]
    return "\n".join(out)


def _first_last(text: str) -> str:
    """First and last non-empty line of an error (the message, the log tail's end)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()] or ["?"]
    return lines[0][:200] + ("" if len(lines) == 1 else f" … {lines[-1][:200]}")


def order_rows(rows: list[dict]) -> None:
    """By preset, concurrency, then server (each in order of first appearance: stock first)."""
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    servers = list(dict.fromkeys(r["server"] for r in rows))
    rows.sort(key=lambda r: (presets.index(r["preset"]), r["concurrency"], servers.index(r["server"])))


def write_results(run_dir: Path, meta: dict, rows: list[dict], raw: dict) -> None:
    order_rows(rows)
    add_speedups(rows)
    (run_dir / "raw").mkdir(parents=True, exist_ok=True)
    (run_dir / "serving.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (run_dir / "serving.md").write_text(report_md(meta, rows))
    (run_dir / "raw" / "serving.raw.json").write_text(json.dumps(raw))


def write_log_tails(run_dir: Path, servers: list[launch.Server], lines: int = 80) -> None:
    """One small file of server log tails (the GPU host returns few files)."""
    text = "".join(f"===== {s.log_path} (last {lines} lines)\n{launch.tail(s.log_path, lines)}\n" for s in servers)
    (run_dir / "raw").mkdir(parents=True, exist_ok=True)
    (run_dir / "raw" / "server_logs.txt").write_text(text)


def merge_runs(dirs: list[str], results_dir: str) -> Path:
    """Runs of the same GPU (e.g. one preset per GPU command, each under the 10-minute limit) as one
    result: rows of a later folder replace an earlier one's at the same preset, server, concurrency."""
    runs = [(Path(d), json.loads((Path(d) / "serving.json").read_text())) for d in dirs]
    gpus = sorted({run["meta"]["gpu"] for _, run in runs})
    if len(gpus) != 1:
        raise SystemExit(f"will not merge runs of different GPUs: {gpus}")
    meta = {**runs[0][1]["meta"], "servers": {}, "prompts": {}, "merged_from": [str(d) for d, _ in runs]}
    rows: dict[tuple, dict] = {}
    raw: dict = {}
    for d, run in runs:
        for label, srv in run["meta"]["servers"].items():
            meta["servers"][label] = srv  # a later run of the same server replaces an earlier one, as rows do
        meta["prompts"].update(run["meta"]["prompts"])
        rows.update({(r["preset"], r["server"], r["concurrency"]): r for r in run["rows"]})
        raw_path = d / "raw" / "serving.raw.json"
        raw.update(json.loads(raw_path.read_text()) if raw_path.exists() else {})
    meta["output_tokens"] = sorted({t for _, run in runs for t in run["meta"].get("output_tokens", [])})
    meta["elapsed_s"] = sum(run["meta"].get("elapsed_s") or 0 for _, run in runs)
    busy = [f"{d.name}: {run['meta']['gpu_busy']}" for d, run in runs if run["meta"].get("gpu_busy")]
    meta["gpu_busy"] = "\n".join(busy) or None
    run_dir = Path(results_dir) / f"{meta['date']}-{slug(meta['gpu'])}"
    write_results(run_dir, meta, list(rows.values()), raw)
    return run_dir


# ----- main -------------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="single-1080p, stock + first_k, 16 prompts (~5 min)")
    p.add_argument("--presets", nargs="+", choices=list(workloads.PRESETS))
    p.add_argument("--policies", nargs="+", help="vlcache policies as POLICY or POLICY:PARAM (e.g. first_k:16)")
    p.add_argument("--no-stock", action="store_true", help="leave out the stock SGLang server")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--num-prompts", type=int, help="prompts per run (a run at concurrency c gets at least c)")
    p.add_argument("--probes", type=int, help="requests of the exact-prefix-hit probe")
    p.add_argument("--vlcache-flags", default="",
                   help="more flags for the vlcache servers only (e.g. \"--vlcache-experimental-parallel\")")
    p.add_argument("--model-path", default="/tmp/Qwen2.5-VL-7B-Instruct")
    p.add_argument("--real-weights", action="store_true", help="load the checkpoint's weights (default: dummy)")
    p.add_argument("--mem-fraction", type=float, default=0.7)
    p.add_argument("--server-flags", default="", help="more SGLang flags for every server, stock too (e.g. \"--tp-size 2\")")
    p.add_argument("--port", type=int, default=30000, help="first server's port; the next ones count up")
    p.add_argument("--server-timeout", type=float, default=300)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--results-dir", default="results")
    p.add_argument("--work-dir", default="/tmp/vlcache_serving", help="workload JSONL, server and bench logs")
    p.add_argument("--merge", nargs="+", metavar="RUN_DIR", help="measure nothing: merge the serving.json of "
                   "these run folders (same GPU) into RESULTS/<date>-<gpu>/")
    args = p.parse_args(argv)
    mode = QUICK if args.quick else FULL
    for name, default in mode.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if any(c < 1 for c in args.concurrency):
        p.error("--concurrency values must be >= 1")
    return args


def make_server(label: str, flags: list[str], port: int, log_dir: Path, args: argparse.Namespace) -> launch.Server:
    return launch.Server(label, flags, port, log_dir, mem_fraction=args.mem_fraction, timeout_s=args.server_timeout)


def main(argv: Optional[list[str]] = None) -> Path:
    args = parse_args(argv)
    if args.merge:
        run_dir = merge_runs(args.merge, args.results_dir)
        return _finish(run_dir)
    launch.stop_servers_on_sigterm()
    t_start = time.monotonic()
    date, gpu = datetime.date.today().isoformat(), gpu_name()
    run_dir = Path(args.results_dir) / f"{date}-{slug(gpu)}"
    work_dir = Path(args.work_dir)
    shutil.rmtree(work_dir, ignore_errors=True)
    (work_dir / "logs").mkdir(parents=True)
    works = []
    for preset in args.presets:
        n = args.num_prompts or FULL_PROMPTS.get(preset, 48)
        works.append(build_workload(preset, args.concurrency, n, args.probes, args.seed, work_dir))
        print(f"workload {preset}: {works[-1].counts} prompts per concurrency, "
              f"{len(works[-1].warmup)} warm-up requests", flush=True)
    base = launch.base_flags(args.model_path, dummy=not args.real_weights) + shlex.split(args.server_flags)
    policies = ([] if args.no_stock else ["stock"]) + list(args.policies)
    meta = {"date": date, "gpu": gpu, "model_path": args.model_path,
            "load_format": "real" if args.real_weights else "dummy", "sglang_version": _sglang_version(),
            "mem_fraction": args.mem_fraction, "base_flags": base, "warm": WARM,
            "output_tokens": sorted({workloads.PRESETS[p].output_len for p in args.presets}),
            "prompts": {w.preset: w.counts for w in works}, "servers": {}}
    meta["gpu_busy"] = busy_gpu_warning(gpu_memory_used_mib())
    if meta["gpu_busy"]:
        print(meta["gpu_busy"], flush=True)
    results = Results(run_dir, meta)
    servers = []
    for i, policy in enumerate(policies):
        label = server_label(policy)
        flags = launch.vlcache_flags(policy) + (shlex.split(args.vlcache_flags) if policy != "stock" else [])
        srv = make_server(label, base + flags, args.port + i, work_dir / "logs", args)
        servers.append(srv)
        meta["servers"][label] = {"flags": flags}
        try:
            with srv:
                meta["servers"][label].update(startup_s=srv.startup_s, kv_pool_tokens=kv_pool_tokens(srv.server_info()))
                measure_server(srv, works, work_dir, results)
        except (RuntimeError, OSError, http.client.HTTPException, subprocess.TimeoutExpired) as e:
            meta["servers"][label]["error"] = f"{type(e).__name__}: {e}"
            print(f"server {label}: {e}", flush=True)
        results.save()
        write_log_tails(run_dir, servers)
        print(f"server {label} done at {time.monotonic() - t_start:.0f} s", flush=True)
    meta["elapsed_s"] = round(time.monotonic() - t_start)
    results.save()
    return _finish(run_dir)


def _finish(run_dir: Path) -> Path:
    plot.try_plot("serving", run_dir)
    print(f"\nresults in {run_dir}\n")
    print((run_dir / "serving.md").read_text())
    return run_dir


def _sglang_version() -> str:
    """Without importing sglang (seconds): its distribution metadata, else its _version.py."""
    import importlib.metadata
    import importlib.util
    try:
        return importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:  # a bare site folder (the GPU bundle) may lack it
        spec = importlib.util.find_spec("sglang")
        path = Path(spec.origin).parent / "_version.py" if spec and spec.origin else None
        m = re.search(r"^__version__\s*=[^'\"\n]*['\"]([^'\"]+)", path.read_text(), re.M) if path and path.exists() else None
        return m.group(1) if m else "unknown"


if __name__ == "__main__":
    main()
