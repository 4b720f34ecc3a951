"""Serve the trained checkpoint with stock SGLang and ONE vlcache server, calibrate a layer profile
while the stock server starts, and run `accuracy.py sweep` (every policy and recompute fraction by a
per-request override) over the regimes' data sets.

    python -m benchmarks.tiny_vlm.serve_eval --model /tmp/tiny-qwen2.5-vl --data-dir /tmp/tiny_eval \\
        --sets A,B,multi --knob-sets mix-0.25,mix-0.5,mix-0.75 --out-dir $OUT/accuracy \\
        --log-dir /tmp/tiny_logs --calibration /tmp/tiny_eval/calibration.jsonl --profile $OUT/profile.json \\
        [--deadline-unix T] [--progress $OUT/progress.log] [--sweep-args "--fractions 0,2,5,20"]

Order: the stock server starts; `python -m vlcache_sglang.calibrate` writes the profile meanwhile (on
the calibration requests: training-distribution images, not the eval set); then the vlcache server
starts with `--vlcache-profile` (without it, and saying so, if calibration failed); both /health; the
sweep; both stop. Real weights, --mem-fraction-static 0.3 and a --max-total-tokens cap each: SGLang
sizes a KV pool as (free after loading) - (free before) x (1 - mem fraction), so a neighbour allocating
in between (the other server, the calibration) counts against it; 0.3 leaves ~40 GB of room for that
on an H100/H200, and --max-total-tokens keeps each pool small.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH))
import accuracy  # noqa: E402
import launch  # noqa: E402

# KV slots per server: prompts are ~100-400 tokens, a few dozen in flight.
MAX_TOTAL_TOKENS = 262_144
# Capturing the decode CUDA graphs took 54 s of a 136 s start on the H200 (4 batch sizes, tiny model);
# answers are a few tokens, so both servers decode eagerly and start faster.
NO_CUDA_GRAPH = ["--disable-cuda-graph"]


def server_flags(model: str, max_total_tokens: int) -> list[str]:
    return launch.base_flags(model, dummy=False) + ["--max-total-tokens", str(max_total_tokens)] + NO_CUDA_GRAPH


def vlcache_server_flags(policy: str, extra: str = "") -> list[str]:
    """--enable-vlcache with a default policy (every sweep request overrides it) and extra flags."""
    return launch.vlcache_flags(policy) + shlex.split(extra)


def calibrate_command(model: str, requests: str, profile: str) -> list[str]:
    return [sys.executable, "-m", "vlcache_sglang.calibrate", "--model", model, "--requests", requests,
            "--out", profile, "--device", "cuda"]


def calibrate(model: str, requests: str, profile: str, log_path: Path, timeout_s: float) -> tuple[bool, str]:
    """(profile written, a line saying what happened); never raises: a run without a profile still
    measures every other policy (the server uses a uniform profile then)."""
    t0 = time.monotonic()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(log_path, "w") as log:
            rc = subprocess.run(calibrate_command(model, requests, profile), stdout=log, stderr=subprocess.STDOUT,
                                timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
        return False, f"calibration: no profile after {timeout_s:.0f} s ({log_path})"
    except OSError as e:
        return False, f"calibration could not start: {e}"
    took = time.monotonic() - t0
    if rc != 0 or not Path(profile).is_file():
        return False, f"calibration failed (exit {rc}, {took:.0f} s); {log_path} ends:\n{launch.tail(log_path, 15)}"
    return True, f"calibration: {profile} in {took:.0f} s"


def log_tails(servers: list[launch.Server], lines: int = 40) -> str:
    paths = [(s.label, s.log_path) for s in servers]
    paths += [(p.stem, p) for s in servers for p in sorted(s.log_path.parent.glob(f"{s.log_path.stem}.crash*.log"))]
    return "\n\n".join(f"===== {label}: {path}\n{launch.tail(path, lines)}" for label, path in paths)


def restarter(server: launch.Server):
    """A sweep's `restart`: keep the crashed server's log, start it again, wait for /health."""
    count = [0]

    def restart() -> None:
        count[0] += 1
        server.stop()
        if server.log_path.exists():
            shutil.copy(server.log_path, server.log_path.with_name(f"{server.log_path.stem}.crash{count[0]}.log"))
        server.startup_s = None
        server.start()
        server.wait_healthy()

    return restart


def sweep_argv(args: argparse.Namespace, stock: launch.Server, vl: launch.Server) -> list[str]:
    data = Path(args.data_dir)
    argv = ["sweep", "--vlcache", vl.url, "--stock", stock.url, "--out-dir", args.out_dir]
    for name in [n for n in args.sets.split(",") if n]:
        argv += ["--dataset", f"{name}={data / (name + '.jsonl')}"]
    for name in [n for n in args.knob_sets.split(",") if n]:
        argv += ["--knob-dataset", f"{name}={data / (name + '.jsonl')}"]
    if args.deadline_unix:
        argv += ["--deadline-unix", str(args.deadline_unix)]
    if args.progress:
        argv += ["--progress", args.progress]
    return argv + shlex.split(args.sweep_args)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data-dir", required=True, help="make_eval --out-dir: <set>.jsonl files")
    p.add_argument("--sets", default="A,B,multi", help="data sets that run every config")
    p.add_argument("--knob-sets", default="", help="data sets that run the knob's configs only")
    p.add_argument("--out-dir", required=True, help="accuracy.py sweep's results go here")
    p.add_argument("--log-dir", required=True, help="server and calibration logs (keep them out of $OUT)")
    p.add_argument("--calibration", default=None, help="requests for vlcache_sglang.calibrate (none: no profile)")
    p.add_argument("--profile", default=None, help="where calibration writes the profile")
    p.add_argument("--calibration-timeout-s", type=float, default=240)
    p.add_argument("--server-policy", default="vlcache", help="the vlcache server's default --vlcache-policy")
    p.add_argument("--vlcache-flags", default="",
                   help="more flags for the vlcache server (e.g. --vlcache-blend-score v)")
    p.add_argument("--mem-fraction", type=float, default=0.3,
                   help="--mem-fraction-static per server: room for neighbours' allocations during its start")
    p.add_argument("--max-total-tokens", type=int, default=MAX_TOTAL_TOKENS, help="KV slots per server")
    p.add_argument("--base-port", type=int, default=30100)
    p.add_argument("--server-timeout-s", type=float, default=360)
    p.add_argument("--deadline-unix", type=float, default=None, help="passed to the sweep")
    p.add_argument("--progress", default=None, help="progress lines go here too")
    p.add_argument("--sweep-args", default="", help="more accuracy.py sweep options, one string")
    p.add_argument("--tails-to", default=None, help="write the server log tails here at the end")
    args = p.parse_args(argv)
    if bool(args.calibration) != bool(args.profile):
        p.error("--calibration and --profile go together")

    def note(line: str) -> None:
        print(line, flush=True)
        if args.progress:
            with open(args.progress, "a") as f:
                f.write(line + "\n")

    launch.stop_servers_on_sigterm()
    flags = server_flags(args.model, args.max_total_tokens)
    stock = launch.Server("stock", flags, args.base_port, args.log_dir, mem_fraction=args.mem_fraction,
                          timeout_s=args.server_timeout_s)
    vl = launch.Server("vlcache", flags + vlcache_server_flags(args.server_policy, args.vlcache_flags),
                       args.base_port + 1, args.log_dir, mem_fraction=args.mem_fraction,
                       timeout_s=args.server_timeout_s)

    def calibrate_then_add_profile() -> None:
        if not args.calibration:
            note("no calibration requests: the vlcache server runs without --vlcache-profile (uniform profile)")
            return
        ok, line = calibrate(args.model, args.calibration, args.profile, Path(args.log_dir) / "calibrate.log",
                             args.calibration_timeout_s)
        note(line if ok else line + "\n  -> the vlcache server runs without --vlcache-profile (uniform profile)")
        if ok:
            vl.flags = vl.flags + ["--vlcache-profile", args.profile]

    try:
        with launch.running([stock, vl], after_first_start=calibrate_then_add_profile):
            note(f"servers healthy: stock {stock.startup_s:.0f} s, vlcache {vl.startup_s:.0f} s from their starts")
            accuracy.sweep_main(sweep_argv(args, stock, vl)[1:], restart=restarter(vl))
    finally:
        if args.tails_to:
            Path(args.tails_to).write_text(log_tails([stock, vl]))


if __name__ == "__main__":
    main()
