"""Image affinity across two vlcache replicas behind SGLang's router (smg), against round robin.

    python3 benchmarks/affinity.py --model /tmp/Qwen2.5-VL-7B-Instruct --out-dir $OUT/affinity \
        --log-dir /tmp/affinity_logs                       # GPU host: benchmarks/affinity.sh runs this
    python3 benchmarks/affinity.py --out-dir /tmp/a --log-dir /tmp/a/logs \
        --replica-command "python3 tests/benchmarks/fake_sglang.py {port} --store-images {store_images}" \
        --image-size 64 48                                 # CPU dry run against fakes

Two replicas (`--enable-vlcache` with --replica-policy, the server's default unless given; an image
store of --store-images images each; small memory fractions so both fit one GPU; --layout: a GPU each,
or one --dp-size 2 server) behind one router process. Per arm, the router is started with
that arm's policy, both replicas are flushed, and the same workload goes through the router: one image
(--images-per-request) per request from a pool of --pool-size images (more than one store holds, fewer than two hold),
after text no other request has. Arms:
  round_robin  --policy round_robin: each replica sees every image, so each store thrashes
  cache_aware  --policy cache_aware (the router's default): it routes by text, images are invisible
  affinity     --policy manual --assignment-mode min_group, requests carry X-SMG-Routing-Key
               (vlcache_sglang.routing_key: salt + first image): each image sticks to one replica,
               new images go to the replica with fewer keys in flight
  affinity_spill  --policy power_of_two --routing-key-override, keyed: pinned, and on smg >= 1.10 a
               key's third concurrent request spills to power_of_two (not in the default --arms)
Each arm has its own pool (same sizes, other seeds), so nothing an earlier arm left in a tokenizer-side
cache helps a later one. Hit rate: the replicas' `sglang:vlcache_key_*` gauges over the arm; TTFT from
the first streamed chunk. Writes affinity.{json,md} and requests.jsonl, prints the table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # vlcache_sglang without an install
import launch  # noqa: E402
from accuracy_report import fmt  # noqa: E402  (one table-cell formatter)
import serving  # noqa: E402
import workloads  # noqa: E402

from vlcache_sglang.config import VLCacheConfig  # noqa: E402
from vlcache_sglang.routing_key import PICKS, routing_headers  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    router_flags: tuple[str, ...]
    keyed: bool  # requests carry the routing key header


ARMS = {
    "round_robin": Arm("round_robin", ("--policy", "round_robin"), False),
    "cache_aware": Arm("cache_aware", ("--policy", "cache_aware"), False),
    # min_group: a new key goes to the worker with the fewest distinct keys in flight, which spreads
    # the pool over the stores under load (min_load counts requests: at low load it ties, at random).
    "affinity": Arm("affinity", ("--policy", "manual", "--assignment-mode", "min_group"), True),
    # Keyed requests pinned on top of a load-aware policy. smg >= 1.10 (`delegate` assignment):
    # power_of_two places a new key, and a key with 2 of its own requests in flight on its replica
    # spills to power_of_two (a hot image's overflow goes where the load is). smg 1.9.0: the pin
    # alone (new keys at random), no spill.
    "affinity_spill": Arm("affinity_spill", ("--policy", "power_of_two", "--routing-key-override"), True),
}


def qwen_image_tokens(width: int, height: int, factor: int = 28, min_pixels: int = 3136,
                      max_pixels: int = 12_845_056) -> int:
    """Image tokens Qwen2.5-VL's processor gives a width x height image (its smart_resize, merged 2x2)."""
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return (h // factor) * (w // factor)


# ----- workload ---------------------------------------------------------------------------------

def workload_spec(args: argparse.Namespace, seed: int) -> workloads.WorkloadSpec:
    return workloads.WorkloadSpec(num_requests=args.requests, pool_size=args.pool_size, resolution="1080p",
                                  images_per_request=tuple(args.images_per_request), system_words=(5, 60),
                                  shuffle_order=True, zipf=args.zipf,
                                  output_len=args.max_tokens, seed=seed)


def arm_rows(args: argparse.Namespace, arm_index: int) -> list[dict]:
    """The workload of one arm: the same request sequence for every arm (seed --seed), its images
    replaced by the arm's own pool (seed --seed + 1 + arm_index), so caches carry nothing over."""
    spec = workload_spec(args, args.seed)
    tiny = (32, 32)  # the sequence's own images only name pool slots: cheap stand-ins, swapped below
    base_pool = workloads._pool(spec, tiny)
    arm_pool = workloads._pool(dataclasses.replace(spec, seed=args.seed + 1 + arm_index), tuple(args.image_size))
    swap = dict(zip(base_pool, arm_pool))
    assert len(swap) == spec.pool_size, "two stand-in images are equal"
    rows = []
    for i, row in enumerate(workloads.generate(spec, tiny)):
        for m in row["messages"]:
            for part in m["content"] if isinstance(m["content"], list) else ():
                if part.get("type") == "image_url":
                    part["image_url"]["url"] = swap[part["image_url"]["url"]]
        if args.tenants:
            row["cache_salt"] = f"tenant-{i % args.tenants}"
        rows.append(row)
    return rows


# ----- servers ----------------------------------------------------------------------------------

LAYOUTS = {
    "shared-gpu": "two replicas on GPU 0 (small --mem-fraction each), started one after the other",
    "gpu-each": "two replicas, replica i on GPUs [i*G, (i+1)*G) (--gpus-per-replica G, each replica then --tp-size G)",
    "dp": "one server with --dp-size 2 (a scheduler and a store per rank), router --dp-aware",
}


def replica_servers(args: argparse.Namespace) -> list[launch.Server]:
    tokens = qwen_image_tokens(*args.image_size)
    # Room for --store-images whole images and half of another: the next one evicts.
    store_tokens = args.store_images * tokens + tokens // 2
    dp_size = 2 if args.layout == "dp" else 1
    servers = []
    for i in range(1 if args.layout == "dp" else 2):
        port = args.base_port + 1 + i
        label = "dp" if args.layout == "dp" else f"replica{i}"
        if args.replica_command:
            cmd = shlex.split(args.replica_command.format(port=port, store_images=args.store_images, dp_size=dp_size))
            servers.append(launch.Server(label, [], port, args.log_dir, command=cmd,
                                         timeout_s=args.server_timeout_s, poll_s=0.5))
            continue
        # --max-total-tokens: the same KV pool on both (the second profiles the GPU with the first on it).
        flags = (launch.base_flags(args.model) + launch.vlcache_flags(args.replica_policy)
                 + ["--vlcache-mm-store-tokens", str(store_tokens), "--max-total-tokens", str(args.max_total_tokens)]
                 + shlex.split(args.replica_flags))
        if args.layout == "gpu-each":
            flags += ["--base-gpu-id", str(i * args.gpus_per_replica)]
        parallel = (["--dp-size", str(dp_size)] if args.layout == "dp" else []) + (
            ["--tp-size", str(args.gpus_per_replica)] if args.gpus_per_replica > 1 else [])
        if parallel:  # vlcache refuses TP / DP without the flag
            flags += parallel + ["--vlcache-experimental-parallel"]
        servers.append(launch.Server(label, flags, port, args.log_dir, mem_fraction=args.mem_fraction,
                                     timeout_s=args.server_timeout_s))
    return servers


def router_server(args: argparse.Namespace, arm: Arm, workers: list[launch.Server]) -> launch.Server:
    cmd = [*shlex.split(args.router_command), "--host", "127.0.0.1", "--port", str(args.base_port),
           "--worker-urls", *[w.url for w in workers], *arm.router_flags, *shlex.split(args.router_flags)]
    if args.layout == "dp":
        cmd.append("--dp-aware")  # one worker per rank (url@rank); the rank goes in the body
    return launch.Server(f"router_{arm.name}", [], args.base_port, args.log_dir, command=cmd, timeout_s=60,
                         poll_s=0.5)


def served_model(url: str) -> str:
    """The model name the router matches requests against (SGLang: --served-model-name, else the path)."""
    status, body = launch.http_get(url + "/v1/models")
    if status != 200:
        raise RuntimeError(f"GET {url}/v1/models answered {status}: {body[:200]}")
    return json.loads(body)["data"][0]["id"]


def wait_routable(router_url: str, model: str, timeout_s: float = 60) -> float:
    """Seconds until a text-only request through the router answers 200: /health answers before the
    router has registered its workers."""
    t0 = time.monotonic()
    body = {"model": model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
    while True:
        status, text = launch.http_post(router_url + "/v1/chat/completions", body, timeout_s=30)
        if status == 200:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(f"router {router_url}: no 200 within {timeout_s:.0f} s, last {status}: {text[:300]}")
        time.sleep(0.5)


def flush(replicas: list[launch.Server]) -> None:
    for r in replicas:
        for _ in range(20):  # 400 while requests still run
            status, _ = launch.http_post(r.url + "/flush_cache", timeout_s=30)
            if status == 200:
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"{r.label}: /flush_cache did not answer 200")


def warm_up(args: argparse.Namespace, replicas: list[launch.Server], model: str) -> None:
    """Each replica directly: an image none of the arms uses, twice after other text (a miss that
    stores it, then a hit: both paths compiled and captured before anything is measured)."""
    spec = workload_spec(args, args.seed + 100)
    one = dataclasses.replace(spec, pool_size=1, images_per_request=(1, 1))
    image = workloads._pool(one, tuple(args.image_size))[0]
    for r in replicas:
        for text in ("Warm-up, first sight:", "Warm-up again, other words first:"):
            body = {"model": model, "max_tokens": 2, "temperature": 0, "messages": [{"role": "user", "content": [
                {"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": image}}]}]}
            serving.stream_chat(r.url, body, timeout_s=args.request_timeout_s)


# ----- one arm ----------------------------------------------------------------------------------

def _one(router_url: str, body: dict, keyed: bool, timeout_s: float, pick: str) -> dict:
    headers = routing_headers(body, pick=pick) if keyed else {}
    t0 = time.perf_counter()
    try:
        out = serving.stream_chat(router_url, body, timeout_s=timeout_s, headers=headers)
        out["ok"] = out.get("ttft_ms") is not None
    except Exception as e:  # noqa: BLE001 - a failed request is a row of the report, not a crash
        out = {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
    out["latency_ms"] = (time.perf_counter() - t0) * 1000
    out["routing_key"] = headers.get("X-SMG-Routing-Key")
    return out


def percentile(xs: list[float], q: float) -> Optional[float]:
    if not xs:
        return None
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1] if len(xs) > 1 else xs[0]


def run_arm(args: argparse.Namespace, arm: Arm, rows: list[dict], router_url: str,
            replicas: list[launch.Server]) -> tuple[dict, list[dict]]:
    flush(replicas)
    before = {r.label: r.metrics() for r in replicas}
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(lambda row: _one(router_url, row, arm.keyed, args.request_timeout_s, args.pick),
                                rows))
    after = {r.label: r.metrics() for r in replicas}
    per = {r.label: launch.gauge_deltas(before[r.label], after[r.label]) for r in replicas}
    hits = sum(d["key_hits"] for d in per.values())
    lookups = sum(d["key_lookups"] for d in per.values())
    ttft = [r["ttft_ms"] for r in results if r["ok"]]
    errors = [r["error"] for r in results if not r["ok"] and "error" in r]
    summary = {
        "arm": arm.name, "router": " ".join(arm.router_flags), "keyed": arm.keyed, "requests": len(rows),
        "ok": len(ttft), "errors": len(rows) - len(ttft), "first_errors": errors[:3],
        "hit_rate": hits / lookups if lookups else None, "key_hits": hits, "key_lookups": lookups,
        "lookups_per_replica": [per[r.label]["key_lookups"] for r in replicas],
        "store_tokens": [per[r.label]["store_tokens"] for r in replicas],
        "ttft_p50_ms": percentile(ttft, 50), "ttft_p90_ms": percentile(ttft, 90),
        "ttft_mean_ms": statistics.fmean(ttft) if ttft else None,
    }
    return summary, results


# ----- report -----------------------------------------------------------------------------------

def table_md(rows: list[dict]) -> str:
    lines = ["| arm | router | ok / requests | hit rate | hits / lookups | lookups per replica | TTFT p50 ms "
             "| TTFT p90 ms |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        split = " / ".join(fmt(x, ".0f") for x in r["lookups_per_replica"])
        lines.append(f"| {r['arm']} | `{r['router']}`{' + key' if r['keyed'] else ''} | {r['ok']} / {r['requests']} "
                     f"| {fmt(r['hit_rate'], '.2f')} | {fmt(r['key_hits'], '.0f')} / {fmt(r['key_lookups'], '.0f')} "
                     f"| {split} | {fmt(r['ttft_p50_ms'], '.0f')} | {fmt(r['ttft_p90_ms'], '.0f')} |")
    return "\n".join(lines)


def write_report(out_dir: Path, meta: dict, rows: list[dict], per_request: dict[str, list[dict]]) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "affinity.json").write_text(json.dumps({"meta": meta, "arms": rows}, indent=1))
    with open(out_dir / "requests.jsonl", "w") as f:
        for arm, results in per_request.items():
            for i, r in enumerate(results):
                f.write(json.dumps({"arm": arm, "i": i, **r}) + "\n")
    table = table_md(rows)
    notes = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    (out_dir / "affinity.md").write_text(f"# Image affinity behind SGLang's router\n\n{table}\n\n{notes}\n")
    return table


# ----- main -------------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--log-dir", required=True, help="server and router logs")
    p.add_argument("--model", default="/tmp/Qwen2.5-VL-7B-Instruct")
    p.add_argument("--arms", default="round_robin,affinity,cache_aware",
                   help=f"comma list of {list(ARMS)}, run in this order (the deadline skips the last ones)")
    p.add_argument("--pool-size", type=int, default=10, help="distinct images per arm")
    p.add_argument("--store-images", type=int, default=5, help="images one replica's store holds")
    p.add_argument("--requests", type=int, default=160)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--tenants", type=int, default=0, help="cache_salt tenant-(i mod N) per request (0: none)")
    p.add_argument("--zipf", type=float, default=0.0)
    p.add_argument("--images-per-request", type=int, nargs=2, default=(1, 1), metavar=("LO", "HI"),
                   help="images of a request, from the pool, in random order")
    p.add_argument("--pick", choices=PICKS, default="first", help="routing_key's pick: first image, or min (the set)")
    p.add_argument("--image-size", type=int, nargs=2, default=(1920, 1080), metavar=("W", "H"))
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=list(LAYOUTS), default="shared-gpu",
                   help="; ".join(f"{k}: {v}" for k, v in LAYOUTS.items()))
    p.add_argument("--gpus-per-replica", type=int, default=1, help="gpu-each: GPUs per replica (its --tp-size)")
    p.add_argument("--mem-fraction", type=float, default=0.3)
    p.add_argument("--max-total-tokens", type=int, default=100_000, help="KV pool of each replica")
    p.add_argument("--replica-policy", default=VLCacheConfig.policy,
                   help="the replicas' recompute policy as serving.py's labels (POLICY[:PARAM]); the "
                   "server's default unless given. `full` makes a hit save only the vision encoder")
    p.add_argument("--replica-flags", default="", help="more flags for both replicas")
    p.add_argument("--replica-command", default=None,
                   help="launch each replica with this command instead ({port}, {store_images}, {dp_size}: dry runs)")
    p.add_argument("--router-command", default=f"{sys.executable} -m smg.launch_router",
                   help="the router's launcher (its flags are smg's: --host --port --worker-urls --policy ...)")
    p.add_argument("--router-flags", default="", help="more flags for every arm's router")
    p.add_argument("--base-port", type=int, default=30300, help="router; replicas on the next two ports")
    p.add_argument("--server-timeout-s", type=float, default=360)
    p.add_argument("--request-timeout-s", type=float, default=120)
    p.add_argument("--deadline-unix", type=float, default=None, help="no arm starts after this")
    args = p.parse_args(argv)
    unknown = [a for a in args.arms.split(",") if a not in ARMS]
    if unknown:
        p.error(f"unknown arms {unknown}; choose from {list(ARMS)}")
    if not 1 <= args.store_images < args.pool_size:
        p.error(f"--store-images must be in [1, --pool-size): one store must not hold the pool, got "
                f"{args.store_images} and {args.pool_size}")
    return args


def run_meta(args: argparse.Namespace) -> dict:
    meta = {"layout": f"{args.layout}: {LAYOUTS[args.layout]}", "model": args.model, "pool_size": args.pool_size,
            "store_images": args.store_images, "image_size": list(args.image_size),
            "image_tokens": qwen_image_tokens(*args.image_size), "requests": args.requests,
            "concurrency": args.concurrency, "tenants": args.tenants, "zipf": args.zipf,
            "images_per_request": list(args.images_per_request), "pick": args.pick,
            "mem_fraction": args.mem_fraction, "replica_policy": args.replica_policy,
            "replica_command": args.replica_command}
    if args.replica_command:  # a dry run's stand-in replicas: no model, no GPU, no memory share
        for key in ("layout", "model", "mem_fraction", "replica_policy"):
            meta.pop(key)
    if args.layout == "dp":
        meta["gauges"] = "summed over the DP ranks' samples (label dp_rank)"
    return meta


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    launch.stop_servers_on_sigterm()
    replicas = replica_servers(args)
    arms = [ARMS[a] for a in args.arms.split(",")]
    rows, per_request, skipped = [], {}, []
    meta, t0 = run_meta(args), time.monotonic()
    try:
        # shared-gpu one after the other: SGLang sizes its KV pool from the GPU memory free when it
        # starts, so two starting at once on one GPU race for it (and the second reuses the first's
        # kernel caches).
        with launch.running(replicas, first_alone=args.layout == "shared-gpu"):
            print(f"replicas healthy after {max(r.startup_s for r in replicas):.0f} s", flush=True)
            model = served_model(replicas[0].url)
            warm_up(args, replicas, model)
            for i, arm in enumerate(arms):
                if args.deadline_unix and time.time() > args.deadline_unix:
                    skipped.append(arm.name)
                    continue
                work = arm_rows(args, i)
                with router_server(args, arm, replicas) as router:
                    routable_s = wait_routable(router.url, model)
                    summary, results = run_arm(args, arm, [{**w, "model": model} for w in work], router.url,
                                               replicas)
                summary["router_routable_s"] = round(routable_s, 1)
                rows.append(summary)
                per_request[arm.name] = results
                print(f"arm {arm.name}: hit rate {fmt(summary['hit_rate'], '.2f')}, TTFT p50 "
                      f"{fmt(summary['ttft_p50_ms'], '.0f')} ms, errors {summary['errors']}", flush=True)
    finally:  # also on SIGTERM (the time limit) or a server that died: the arms that finished
        meta.update({"skipped_arms (deadline)": skipped, "wall_s": round(time.monotonic() - t0),
                     "arms_not_run": [a.name for a in arms if a.name not in per_request and a.name not in skipped]})
        table = write_report(Path(args.out_dir), meta, rows, per_request)
        print("\n" + table, flush=True)
    return {"arms": rows, "skipped": skipped}


if __name__ == "__main__":
    report = main()
    ok = report["arms"] and all(r["errors"] == 0 for r in report["arms"])
    sys.exit(0 if ok else 1)
