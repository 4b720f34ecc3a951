"""compression_speed.py without a GPU: server flags, the log and metrics parsing, the stop rule of the
capacity watch, the ratios and tables, and a whole run against a fake SGLang with a KV pool
(fake_capacity_sglang.py) and a fake bench_serving."""

import functools
import json
import sys
import textwrap
from pathlib import Path

import pytest
from ports import free_port_block

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "benchmarks"))
import compression_speed as cs  # noqa: E402
import launch  # noqa: E402
import serving  # noqa: E402

SMALL = (56, 56)
BASE = launch.base_flags("/m")


def test_both_servers_run_compressions_backends_and_the_vlcache_one_has_no_store():
    stock, ours = cs.stock_flags(BASE), cs.compress_flags(BASE, 0.1)
    assert ours[:len(stock)] == stock, "the same backends, schedule and logging on both"
    for flag in launch.COMPRESSION_DECODE_FLAGS + ["--attention-backend", "flashinfer"]:
        assert flag in stock
    extra = ours[len(stock):]
    assert extra[extra.index("--vlcache-compress-ratio") + 1] == "0.1"
    assert extra[extra.index("--vlcache-policy") + 1] == "full" and "--enable-vlcache" in extra
    assert extra[extra.index("--vlcache-mm-store-tokens") + 1] == "1"
    assert cs.override(1.0) == {"custom_params": {"vlcache": {"policy": "full", "compress_ratio": 1.0}}}


def _no_gpu_no_plot(monkeypatch) -> None:
    """What the driver asks of the host (GPU name, memory, images at full size, the plot) made offline."""
    monkeypatch.setattr(serving, "gpu_name", lambda: "fake")
    monkeypatch.setattr(serving, "gpu_memory_used_mib", lambda: 0)
    monkeypatch.setattr(serving, "build_workload", functools.partial(serving.build_workload, size_override=SMALL))
    monkeypatch.setattr(cs.plot, "try_plot", lambda kind, run_dir: None)


def test_stock_as_users_run_it_keeps_sglangs_decode_backend_and_overlap():
    flags = cs.stock_default_flags(BASE)
    assert flags[:len(BASE)] == BASE and "--decode-attention-backend" not in flags
    assert "--disable-overlap-schedule" not in flags and "--decode-log-interval" in flags


def test_ours_runs_first_then_stock_then_the_default_decode_stock(tmp_path, monkeypatch):
    import time
    _no_gpu_no_plot(monkeypatch)
    out_dir = cs.main(["--out-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"),
                       "--deadline-unix", str(time.time() + 60), "--capacity-requests", "0", "--stock-default-decode",
                       "--server-flags=--triton-attention-num-kv-splits 64", "--server-flags=--cuda-graph-max-bs=16"])
    data = json.loads((out_dir / "compression_speed.json").read_text())
    assert data["meta"]["skipped"] == ["server vlcache-compress-0.1", "server stock", f"server {cs.STOCK_DEFAULT}"]
    extra = ["--triton-attention-num-kv-splits", "64", "--cuda-graph-max-bs=16"]
    assert data["meta"]["servers"][cs.STOCK_DEFAULT]["flags"] == cs.LOG_FLAGS
    assert data["meta"]["extra_server_flags"] == extra
    assert "Every server also: `--triton-attention-num-kv-splits 64 --cuda-graph-max-bs=16`" in \
        (out_dir / "compression_speed.md").read_text()


def test_bench_command_carries_the_override(tmp_path):
    body = cs.override(0.1)
    cmd = serving.bench_command("http://127.0.0.1:1", tmp_path / "w.jsonl", 4, 1, tmp_path / "o.jsonl", body)
    assert json.loads(cmd[cmd.index("--extra-request-body") + 1]) == body
    assert "--extra-request-body" not in serving.bench_command("u", tmp_path / "w", 4, 1, tmp_path / "o")


def test_workload_output_len_is_a_parameter(tmp_path):
    work = serving.build_workload("single-1080p", [1], 2, 1, seed=1, work_dir=tmp_path, size_override=SMALL,
                                  output_len=256)
    rows = [json.loads(line) for line in open(work.files[1])]
    assert [r["max_tokens"] for r in rows + work.probes] == [256] * 3
    assert work.warmup[0]["max_tokens"] == 1, "the warm-up still generates one token"


LOG = textwrap.dedent("""\
    [2026-12-01 10:00:00] Prefill batch, #new-seq: 1, #new-token: 8192, #cached-token: 0, token usage: 0.03, #running-req: 0, #queue-req: 5, #pending-token: 0,
    [2026-12-01 10:00:01] Decode batch, #running-req: 2, #token: 84000, token usage: 0.06, cuda graph: True, gen throughput (token/s): 80.0, #queue-req: 4,
    [2026-12-01 10:00:02] Decode batch, #running-req: 31, #token: 1300000, token usage: 0.93, cuda graph: False, gen throughput (token/s): 900.0, #queue-req: 9,
    [2026-12-01 10:00:03] Decode batch, #running-req: 31, #token: 1310000, token usage: 0.94, cuda graph: False, gen throughput (token/s): 910.0, #queue-req: 9,
    [2026-12-01 10:00:04] Prefill batch, #new-seq: 1, #new-token: 512, #cached-token: 0, token usage: 0.90, #running-req: 30, #queue-req: 12, #pending-token: 0,
    [2026-12-01 10:00:05] Decode batch, #running-req: 30, #token: 1320000, token usage: 0.95, cuda graph: False, gen throughput (token/s): 890.0, #queue-req: 10,
""")


def test_log_peak_reads_sglangs_decode_lines():
    peak = cs.log_peak(LOG)
    assert peak == {"peak_running": 31, "tokens_at_peak": 1310000, "usage_at_peak": 0.94, "decode_lines": 4,
                    "peak_queue": 12}
    assert cs.log_peak("no batches")["peak_running"] is None


def test_decode_graph_share_counts_logged_decode_batches():
    assert cs.decode_graph_share(LOG) == {"decode_batches_logged": 4, "decode_batches_in_graph": 1}
    assert cs.decode_graph_share("no batches") == {"decode_batches_logged": 0, "decode_batches_in_graph": 0}


def test_parse_gauges_with_labels():
    text = ('# HELP sglang:num_running_reqs x\nsglang:num_running_reqs{model_name="m",engine_type="unified"} 7.0\n'
            'sglang:num_queue_reqs{model_name="m"} 3.0\nsglang:vlcache_compressed_requests 2.0\n')
    g = launch.parse_gauges(text, "sglang:")
    assert g["num_running_reqs"] == 7 and g["num_queue_reqs"] == 3 and g["vlcache_compressed_requests"] == 2
    assert launch.parse_vlcache_gauges(text) == {"compressed_requests": 2.0}


def _watch(samples, target=10, settle_s=3.0, timeout_s=100.0):
    """watch_running over canned (running, queued) samples, one per fake second."""
    it, now = iter(samples), [0.0]

    def sleep(s):
        now[0] += 1.0

    return cs.watch_running(lambda: next(it), target, settle_s, timeout_s, clock=lambda: now[0], sleep=sleep)


def test_watch_stops_when_all_run():
    assert _watch([(0, 0), (4, 6), (10, 0)]) == {"peak_running_metrics": 10, "stopped": "all running", "watch_s": 2.0}


def test_watch_stops_when_the_pool_is_full():
    out = _watch([(0, 0)] * 5 + [(3, 7), (5, 5)] + [(5, 5)] * 10)
    assert out["peak_running_metrics"] == 5 and out["stopped"].startswith("no growth for 3 s, 5 waiting")
    assert out["watch_s"] == 9.0, "three seconds after the last growth"


def test_watch_waits_while_nothing_queues_and_then_times_out():
    out = _watch([(0, 0)] * 8 + [(None, None)] * 5, timeout_s=10)
    assert out == {"peak_running_metrics": 0, "stopped": "timeout 10 s", "watch_s": 10.0}


def _row(server, preset, conc, ttft, e2e, itl):
    return {"preset": preset, "server": server, "concurrency": conc, "num_prompts": 4,
            **serving.summarise({"completed": 4, "median_ttft_ms": ttft, "median_e2e_latency_ms": e2e,
                                 "median_itl_ms": itl, "median_tpot_ms": itl * 1.1, "output_throughput": 100.0,
                                 "request_throughput": 1.0, "duration": 4.0}, {}, 4)}


def test_ratios_against_alpha_one_on_the_same_preset_and_concurrency():
    rows = [_row("stock", "multi-4k", 1, 3000, 5000, 8.0), _row("vlcache α=0.1", "multi-4k", 1, 1530, 3000, 7.0),
            _row("vlcache α=1", "multi-4k", 1, 1500, 3300, 8.0), _row("vlcache α=0.1", "multi-4k", 16, 9000, 20000, 10.0),
            {"preset": "multi-4k", "server": "vlcache α=1", "concurrency": 16, "error": "bench_serving exited 1"}]
    cs.add_ratios(rows, cs.variant_label(1.0))
    ours = rows[1]
    assert ours["decode_tok_per_s"] == pytest.approx(1000 / 7)
    assert ours["decode_speedup_vs_uncompressed"] == pytest.approx(8 / 7)
    assert ours["e2e_speedup_vs_uncompressed"] == pytest.approx(3300 / 3000)
    assert ours["ttft_overhead_ms"] == pytest.approx(30)
    assert rows[2]["decode_speedup_vs_uncompressed"] == pytest.approx(1.0)
    assert rows[3]["e2e_speedup_vs_uncompressed"] is None, "its reference failed"
    table = cs.speed_table(rows)
    assert "| multi-4k | 1 | vlcache α=0.1 | 1530 | 3000 | 7.00 | 142.9 | 7.70 | 100 | 4/4 | 1.10× | 1.14× | +30 |" in table
    assert "failed: bench_serving exited 1" in table
    assert table.count("\n") == len(rows) + 1


def test_capacity_estimate_and_table():
    full = {"alpha": 1.0, "sent": 40, "peak_running": 31, "tokens_at_peak": 1_310_000, "peak_running_metrics": 31,
            "stopped": "no growth for 8 s, 9 waiting", "compressed_requests": 0.0, "compress_freed_slots": 0.0}
    small = {**full, "alpha": 0.1, "peak_running": 40, "tokens_at_peak": 200_000, "peak_running_metrics": 40,
             "stopped": "all running", "compressed_requests": 40.0, "compress_freed_slots": 1_520_000.0}
    assert cs.capacity_estimate(full, 1_400_000) == pytest.approx(1_400_000 / (1_310_000 / 31))
    assert cs.capacity_estimate(small, None) is None and cs.capacity_estimate({}, 10) is None
    table = cs.capacity_table([small, full, {"alpha": 0.5, "sent": 40, "error": "RuntimeError: refused"}], 1_400_000)
    assert "| 0.1 | 40 | 40 (all sent: ≥) | 40 | 200000 | 5000 | 1400000 | 280 | all running | 40 | 1520000 |" in table
    assert "| 1 | 40 | 31 | 31 | 1310000 | 42258 | 1400000 | 33 |" in table
    assert "failed: RuntimeError: refused" in table


# A fake bench_serving: one result line; its ITL depends on the per-request alpha it was given.
FAKE_BENCH = textwrap.dedent("""\
    import json, sys
    argv = sys.argv
    out, n = argv[argv.index("--output-file") + 1], int(argv[argv.index("--num-prompts") + 1])
    extra = json.loads(argv[argv.index("--extra-request-body") + 1]) if "--extra-request-body" in argv else {}
    alpha = extra.get("custom_params", {}).get("vlcache", {}).get("compress_ratio", 1.0)
    assert sum(1 for _ in open(argv[argv.index("--dataset-path") + 1])) == n
    itl = 8.0 if alpha < 1 else 10.0
    open(out, "a").write(json.dumps({"completed": n, "median_ttft_ms": 100.0 + (5 if alpha < 1 else 0),
        "p90_ttft_ms": 150.0, "median_e2e_latency_ms": 100 + 255 * itl, "median_itl_ms": itl, "median_tpot_ms": itl,
        "request_throughput": 1.0, "output_throughput": 256.0, "duration": 1.0}) + "\\n")
""")


def test_whole_run_with_a_fake_pool(tmp_path, monkeypatch, capsys):
    (tmp_path / "fake_bench.py").write_text(FAKE_BENCH)

    def make_server(label, flags, port, log_dir, args):
        cmd = [sys.executable, str(HERE / "fake_capacity_sglang.py"), str(port)]
        return launch.Server(label, flags, port, log_dir, command=cmd, timeout_s=20, poll_s=0.05)

    def bench_command(url, dataset, n, conc, out, extra_body=None):
        cmd = [sys.executable, str(tmp_path / "fake_bench.py"), "--output-file", str(out), "--num-prompts", str(n),
               "--dataset-path", str(dataset)]
        return cmd + (["--extra-request-body", json.dumps(extra_body)] if extra_body else [])

    monkeypatch.setattr(serving, "make_server", make_server)
    monkeypatch.setattr(serving, "bench_command", bench_command)
    monkeypatch.setattr(serving, "build_workload", functools.partial(serving.build_workload, size_override=SMALL))
    monkeypatch.setattr(serving, "gpu_name", lambda: "NVIDIA H200 (fake)")
    monkeypatch.setattr(serving, "gpu_memory_used_mib", lambda: 0)
    monkeypatch.setattr(cs.plot, "try_plot", lambda kind, run_dir: None)
    port = free_port_block(3)  # one server a run at --port + i
    out_dir = cs.main(["--out-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"), "--port", str(port),
                       "--capacity-requests", "6", "--capacity-settle-s", "0.6", "--capacity-timeout-s", "8"])
    data = json.loads((out_dir / "compression_speed.json").read_text())
    order = [(r["preset"], r["concurrency"], r["server"]) for r in data["speed"]]
    servers = ["vlcache α=0.1", "vlcache α=1", "stock"]  # the run's order: the compressing server first
    assert order == [(p, c, s) for p in cs.PRESETS for c in (1, 16) for s in servers]
    assert all("error" not in r for r in data["speed"])
    ours = {(r["preset"], r["concurrency"]): r for r in data["speed"] if r["server"] == "vlcache α=0.1"}
    assert ours[("multi-4k", 1)]["decode_speedup_vs_uncompressed"] == pytest.approx(10 / 8)
    assert ours[("multi-4k", 1)]["ttft_overhead_ms"] == pytest.approx(5)
    assert data["meta"]["prompts"]["multi-4k"] == {"1": 3, "16": 16}
    assert data["meta"]["servers"]["vlcache-compress-0.1"]["kv_pool_tokens"] == 4000
    cap = {r["alpha"]: r for r in data["capacity"]}
    assert cap[0.1]["peak_running"] == 6 and cap[0.1]["stopped"] == "all running"
    assert cap[0.1]["compressed_requests"] == 6 and cap[0.1]["tokens_at_peak"] == 600
    assert cap[1.0]["peak_running"] == 3 and cap[1.0]["stopped"].startswith("no growth")
    assert cap[1.0]["compressed_requests"] == 0 and cap[1.0]["drained"]
    assert data["meta"]["skipped"] == []
    md = (out_dir / "compression_speed.md").read_text()
    assert "## Capacity (4×4K)" in md and "6 (all sent: ≥)" in md
    out = capsys.readouterr().out
    assert out.rstrip().endswith(cs.capacity_table(data["capacity"], 4000).rstrip()), "the tables come last"


def test_deadline_skips_phases_and_says_so(tmp_path, monkeypatch):
    import time
    _no_gpu_no_plot(monkeypatch)
    out_dir = cs.main(["--out-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"),
                       "--deadline-unix", str(time.time() + 60), "--capacity-requests", "2"])
    data = json.loads((out_dir / "compression_speed.json").read_text())
    assert data["meta"]["skipped"] == ["server vlcache-compress-0.1", "server stock"], "a start needs 120 s"
    assert "Skipped (time budget):** server vlcache-compress-0.1, server stock" in \
        (out_dir / "compression_speed.md").read_text()


def test_flags_added_to_stock_are_sglang_server_args():
    import importlib.util
    spec = importlib.util.find_spec("sglang")  # top level only: importing sglang takes seconds
    if spec is None:
        pytest.skip("sglang is not installed")
    source = (Path(spec.origin).parent / "srt" / "server_args.py").read_text()
    for flag in (a for a in cs.stock_flags(BASE)[len(BASE):] if a.startswith("--")):
        assert f"    {flag[2:].replace('-', '_')}:" in source, f"SGLang has no {flag}"
