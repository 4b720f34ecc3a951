"""serving.py without a GPU: workload slices, bench_serving flags, the streaming probe, the table, and
the whole run against fake servers and a fake bench_serving."""

import functools
import http.server
import importlib.util
import json
import re
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from ports import free_port_block

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import launch  # noqa: E402
import serving  # noqa: E402

SMALL = (56, 56)


def _texts(row):
    return json.dumps([m for m in row["messages"]]).split("data:image")[0]


def test_workload_slices_are_disjoint_and_share_the_pool(tmp_path):
    work = serving.build_workload("single-1080p", [1, 16], 5, 3, seed=2, work_dir=tmp_path, size_override=SMALL)
    assert work.counts == {1: 5, 16: 16}, "a concurrency-16 run fills every slot"
    rows = {c: [json.loads(l) for l in open(p)] for c, p in work.files.items()}
    assert {c: len(r) for c, r in rows.items()} == work.counts and len(work.probes) == 3
    all_rows = rows[1] + rows[16] + work.probes
    assert len({json.dumps(r["messages"]) for r in all_rows}) == len(all_rows), "no request repeats"
    pool = {u for r in all_rows for u in serving.image_urls(r)}
    warm_urls = [u for r in work.warmup for u in serving.image_urls(r)]
    assert sorted(warm_urls[:-1]) == sorted(pool), "warm-up: each distinct image once"
    assert warm_urls[-1] == warm_urls[0], "then the first again (a reuse) after other text"
    assert work.warmup[-1]["messages"] != work.warmup[0]["messages"]
    warm_text = {r["messages"][0]["content"][0]["text"] for r in work.warmup}
    assert not any(t in json.dumps(r["messages"]) for t in warm_text for r in all_rows)


def test_bench_command_flags_exist_in_bench_serving(tmp_path):
    cmd = serving.bench_command("http://127.0.0.1:1", tmp_path / "w.jsonl", 8, 16, tmp_path / "o.jsonl")
    assert cmd[1:3] == ["-m", "sglang.bench_serving"]
    assert cmd[cmd.index("--max-concurrency") + 1] == "16" and cmd[cmd.index("--warmup-requests") + 1] == "0"
    spec = importlib.util.find_spec("sglang")  # top level only: importing sglang takes seconds
    if spec is None:
        pytest.skip("sglang is not installed")
    source = (Path(spec.origin).parent / "benchmark" / "serving.py").read_text()  # 0.5.16's bench_serving
    for flag in (a for a in cmd if a.startswith("--")):
        assert f'"{flag}"' in source, f"bench_serving has no {flag}"
    assert '"sglang-oai-chat"' in source


def _canned(ttft, rps):
    return {"completed": 8, "median_ttft_ms": ttft, "p90_ttft_ms": ttft * 1.5, "median_e2e_latency_ms": ttft + 50,
            "request_throughput": rps, "output_throughput": rps * 8, "duration": 8 / rps}


def test_table_speedups_and_gauges():
    window = launch.gauge_deltas({"key_hits": 0, "key_misses": 6, "reused_tokens": 0},
                                 {"key_hits": 8, "key_misses": 6, "reused_tokens": 8000, "recomputed_tokens": 200,
                                  "reused_token_layers": 8000 * 28, "recomputed_token_layers": 200 * 28,
                                  "store_tokens": 15000, "store_bytes": 1})
    rows = [{"preset": "p", "server": "stock", "concurrency": 1, **serving.summarise(_canned(200.0, 4), launch.gauge_deltas({}, {}), 8)},
            {"preset": "p", "server": "vlcache-first_k", "concurrency": 1, **serving.summarise(_canned(50.0, 9), window, 8)},
            {"preset": "p", "server": "vlcache-none", "concurrency": 16, "error": "bench_serving exited 1\nboom"}]
    serving.add_speedups(rows)
    assert rows[0]["ttft_speedup_vs_stock"] == 1.0 and rows[1]["ttft_speedup_vs_stock"] == 4.0
    assert rows[0]["hit_rate"] is None and rows[1]["hit_rate"] == 1.0
    assert rows[1]["recomputed_fraction"] == pytest.approx(0.025)
    table = serving.table_md(rows).splitlines()
    assert len(table) == 5 and all(line.count("|") == table[0].count("|") for line in table)
    assert "| p | vlcache-first_k | 1 | 50 | 75 | 100 | 9.00 | 72 | 4.00× |" in table[3]
    assert "failed: bench_serving exited 1" in table[4]
    partial = serving.summarise({**_canned(90.0, 3), "completed": 6, "errors": ["", "Traceback\nHTTP 500 oom", ""]},
                                {}, 8)
    note = serving.table_md([{"preset": "p", "server": "s", "concurrency": 1, **partial}]).splitlines()[-1]
    assert "6 of 8 requests succeeded" in note and "HTTP 500 oom" in note
    json.dumps(rows, allow_nan=False)  # NaN never reaches serving.json


class _SSE(http.server.BaseHTTPRequestHandler):
    chunks: list = []

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for c in self.chunks:
            self.wfile.write(f"data: {json.dumps(c)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *a):
        pass


def _serve(handler):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


def test_stream_chat_reads_first_token_content_and_usage(monkeypatch):
    chunks = [{"choices": [{"delta": {"role": "assistant", "content": ""}}]},
              {"choices": [{"delta": {"content": ""}}]},
              {"choices": [{"delta": {"content": "hi"}}]},
              {"choices": [], "usage": {"prompt_tokens": 900, "prompt_tokens_details": {"cached_tokens": 899}}}]
    handler = type("H", (_SSE,), {"chunks": chunks})
    srv, url = _serve(handler)
    ticks = iter(range(100))
    monkeypatch.setattr(serving.time, "perf_counter", lambda: next(ticks) * 0.001)
    try:
        r = serving.stream_chat(url, {"messages": [], "max_tokens": 2})
    finally:
        srv.shutdown()
    assert r == {"ttft_ms": pytest.approx(1.0), "content_ttft_ms": pytest.approx(3.0), "prompt_tokens": 900,
                 "cached_tokens": 899}


def test_prefix_probe_refuses_streams_without_tokens():
    srv, url = _serve(type("H", (_SSE,), {"chunks": [{"choices": [], "usage": {}}]}))
    try:
        with pytest.raises(RuntimeError, match="no choice"):
            serving.prefix_hit_probe(url, [{"messages": []}])
    finally:
        srv.shutdown()


# A fake SGLang server: /health, /flush_cache, /server_info, streaming chat, and vlcache gauges that
# count its chat requests (none for the stock one).
FAKE_SGLANG = textwrap.dedent("""\
    import http.server, json, sys
    port, vlcache, die = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3] == "1"
    if die:
        sys.exit("fake: CUDA error at start-up")
    state = {"chats": 0}
    class H(http.server.BaseHTTPRequestHandler):
        def _send(self, body, ctype="text/plain"):
            self.send_response(200); self.send_header("Content-Type", ctype); self.end_headers()
            self.wfile.write(body.encode())
        def do_GET(self):
            if self.path == "/health":
                return self._send("")
            if self.path == "/server_info":
                return self._send(json.dumps({"max_total_num_tokens": 4096}))
            if self.path == "/metrics":
                n = state["chats"]
                g = {"key_hits": n, "key_misses": 1, "reused_tokens": 100 * n, "recomputed_tokens": 5 * n,
                     "reused_token_layers": 2800 * n, "recomputed_token_layers": 140 * n, "store_tokens": 321}
                return self._send("".join(f"sglang:vlcache_{k} {v}\\n" for k, v in g.items()) if vlcache else "")
            self.send_response(404); self.end_headers()
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path == "/flush_cache":
                return self._send("flushed")
            state["chats"] += 1
            chunks = [{"choices": [{"delta": {"role": "assistant", "content": ""}}]},
                      {"choices": [{"delta": {"content": "x"}}]}, {"choices": [], "usage": {"prompt_tokens": 9}}]
            self._send("".join(f"data: {json.dumps(c)}\\n\\n" for c in chunks) + "data: [DONE]\\n\\n")
        def log_message(self, *a): pass
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
""")

# A fake bench_serving: appends one result line whose TTFT depends on the server's port.
FAKE_BENCH = textwrap.dedent("""\
    import json, sys
    argv = sys.argv
    out, url, conc = argv[argv.index("--output-file") + 1], argv[argv.index("--base-url") + 1], int(argv[argv.index("--max-concurrency") + 1])
    n = int(argv[argv.index("--num-prompts") + 1])
    assert sum(1 for _ in open(argv[argv.index("--dataset-path") + 1])) == n
    ttft = 300.0 if url.endswith(":0") else 100.0 + int(url.rsplit(":", 1)[1]) % 7
    open(out, "a").write(json.dumps({"completed": n, "median_ttft_ms": ttft * conc, "p90_ttft_ms": ttft * conc * 2,
        "median_e2e_latency_ms": ttft * conc + 40, "request_throughput": 10.0 / conc, "output_throughput": 80.0,
        "duration": 1.0}) + "\\n")
""")


def test_whole_run_with_fake_servers(tmp_path, monkeypatch, capsys):
    (tmp_path / "fake_sglang.py").write_text(FAKE_SGLANG)
    (tmp_path / "fake_bench.py").write_text(FAKE_BENCH)

    def make_server(label, flags, port, log_dir, args):
        vlcache = "--enable-vlcache" in flags
        die = "full" in flags  # the vlcache-full server fails to start
        cmd = [sys.executable, str(tmp_path / "fake_sglang.py"), str(port), str(int(vlcache)), str(int(die))]
        return launch.Server(label, flags, port, log_dir, command=cmd, timeout_s=20, poll_s=0.05)

    def bench_command(url, dataset, n, conc, out, extra_body=None):
        return [sys.executable, str(tmp_path / "fake_bench.py"), "--output-file", str(out), "--base-url", url,
                "--max-concurrency", str(conc), "--num-prompts", str(n), "--dataset-path", str(dataset)]

    monkeypatch.setattr(serving, "make_server", make_server)
    monkeypatch.setattr(serving, "bench_command", bench_command)
    monkeypatch.setattr(serving, "build_workload", functools.partial(serving.build_workload, size_override=SMALL))
    monkeypatch.setattr(serving, "gpu_name", lambda: "NVIDIA H200 (fake)")
    monkeypatch.setattr(serving.plot, "try_plot", lambda kind, run_dir: None)
    monkeypatch.setattr(serving, "gpu_memory_used_mib", lambda: 100_000)  # a leftover server holds the GPU
    port = free_port_block(3)  # stock, first_k, full at --port + i
    run_dir = serving.main(["--quick", "--policies", "first_k", "full", "--results-dir", str(tmp_path / "res"),
                            "--work-dir", str(tmp_path / "work"), "--port", str(port), "--num-prompts", "3"])
    assert run_dir.name.endswith("-nvidia-h200-fake")
    data = json.loads((run_dir / "serving.json").read_text())
    rows = {(r["server"], r["concurrency"]): r for r in data["rows"]}
    assert list(rows) == [("stock", 1), ("vlcache-first_k", 1), ("stock", 16), ("vlcache-first_k", 16)], \
        "rows by preset, concurrency, server"
    assert "fake: CUDA error at start-up" in data["meta"]["servers"]["vlcache-full"]["error"]
    assert data["meta"]["servers"]["stock"]["kv_pool_tokens"] == 4096
    stock, ours = rows[("stock", 1)], rows[("vlcache-first_k", 1)]
    assert ours["ttft_speedup_vs_stock"] == pytest.approx(stock["ttft_p50_ms"] / ours["ttft_p50_ms"])
    assert stock["hit_rate"] is None and stock["store_tokens"] is None
    # The gauges count the fake's chat requests: the bench runs send none through it, so the window
    # of each run sees no lookups; the store size is read at the end of the run.
    assert ours["key_lookups"] == 0 and ours["store_tokens"] == 321
    assert ours["prefix_hit_ttft_ms"] > 0 and ours["new_text_ttft_ms"] > 0
    raw = json.loads((run_dir / "raw" / "serving.raw.json").read_text())
    assert len(raw["stock/single-1080p/prefix_probe"]["pairs"]) == 3
    assert "vlcache-full" in (run_dir / "raw" / "server_logs.txt").read_text()
    out = capsys.readouterr().out
    assert out.rstrip().endswith(serving.table_md(data["rows"]).rstrip()), "the table is printed last"
    assert re.search(r"vlcache-full`: error", (run_dir / "serving.md").read_text())
    assert "WARNING: 100000 MiB of GPU memory were in use" in (run_dir / "serving.md").read_text()
    assert "WARNING: 100000 MiB" in out


def test_busy_gpu_warning_only_above_the_threshold():
    assert serving.busy_gpu_warning(None) is None
    assert serving.busy_gpu_warning(serving.BUSY_GPU_MIB) is None
    assert "another process shares the GPU" in serving.busy_gpu_warning(serving.BUSY_GPU_MIB + 1)


def _run_json(tmp_path, name, gpu, preset, rows):
    meta = {"date": "2026-01-02", "gpu": gpu, "model_path": "/m", "load_format": "dummy", "sglang_version": "0.5.16",
            "mem_fraction": 0.7, "output_tokens": [8], "prompts": {preset: {"1": 4}}, "elapsed_s": 100,
            "servers": {"stock": {"startup_s": 60.0, "kv_pool_tokens": 1000},
                        "vlcache-first_k": {"startup_s": 70.0, "kv_pool_tokens": 900}}}
    d = tmp_path / name
    d.mkdir()
    (d / "serving.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    return d


def test_merge_runs_of_one_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(serving.plot, "try_plot", lambda kind, run_dir: None)
    rows_a = [{"preset": "single-1080p", "server": s, "concurrency": 1, **serving.summarise(_canned(t, 4), {}, 4)}
              for s, t in (("stock", 200.0), ("vlcache-first_k", 80.0))]
    rows_b = [{"preset": "multi-4k", "server": s, "concurrency": 1, **serving.summarise(_canned(t, 1), {}, 4)}
              for s, t in (("vlcache-first_k", 500.0), ("stock", 2000.0))]
    a = _run_json(tmp_path, "a", "NVIDIA H200", "single-1080p", rows_a)
    b = _run_json(tmp_path, "b", "NVIDIA H200", "multi-4k", rows_b)
    run_dir = serving.main(["--merge", str(a), str(b), "--results-dir", str(tmp_path / "res")])
    data = json.loads((run_dir / "serving.json").read_text())
    assert [(r["preset"], r["server"]) for r in data["rows"]] == [
        ("single-1080p", "stock"), ("single-1080p", "vlcache-first_k"), ("multi-4k", "stock"),
        ("multi-4k", "vlcache-first_k")]
    assert [r["ttft_speedup_vs_stock"] for r in data["rows"]] == [1.0, 2.5, 1.0, 4.0]
    assert data["meta"]["elapsed_s"] == 200 and set(data["meta"]["prompts"]) == {"single-1080p", "multi-4k"}
    assert "2 runs merged" in (run_dir / "serving.md").read_text()
    assert data["meta"]["gpu_busy"] is None
    busy = json.loads((b / "serving.json").read_text())
    busy["meta"]["gpu_busy"] = serving.busy_gpu_warning(90_000)
    (b / "serving.json").write_text(json.dumps(busy))
    run_dir = serving.main(["--merge", str(a), str(b), "--results-dir", str(tmp_path / "res2")])
    assert "b: WARNING: 90000 MiB" in (run_dir / "serving.md").read_text(), "a merge keeps a run's warning"
    c = _run_json(tmp_path, "c", "NVIDIA H100 80GB HBM3", "multi-4k", rows_b)
    with pytest.raises(SystemExit, match="different GPUs"):
        serving.main(["--merge", str(a), str(c), "--results-dir", str(tmp_path / "res")])
