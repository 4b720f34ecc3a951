"""launch.py without a GPU: flags, /metrics parsing, the start/health/stop cycle with fake servers."""

import os
import socket
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import launch  # noqa: E402

# Shape of SGLang 0.5.16's /metrics with --enable-metrics (multiprocess mode): other sglang metrics carry
# labels, our "mostrecent" gauges carry none.
METRICS_SAMPLE = textwrap.dedent("""\
    # HELP sglang:num_running_reqs The number of running requests.
    # TYPE sglang:num_running_reqs gauge
    sglang:num_running_reqs{engine_type="unified",model_name="default",tp_rank="0"} 0.0
    # HELP sglang:vlcache_key_hits vlcache key hits
    # TYPE sglang:vlcache_key_hits gauge
    sglang:vlcache_key_hits 12.0
    sglang:vlcache_key_misses 4.0
    sglang:vlcache_key_mismatches 0.0
    sglang:vlcache_reused_tokens 31680.0
    sglang:vlcache_recomputed_tokens 1584.0
    sglang:vlcache_store_tokens 15840.0
    sglang:vlcache_store_bytes 8.84998144e+08
    sglang:vlcache_hit_rate 0.75
    sglang:vlcache_recomputed_fraction{tp_rank="0"} 0.05 1700000000000
    sglang:prompt_tokens_total{model_name="default"} 51234.0
""")


def test_base_flags_match_gpu_env():
    flags = launch.base_flags("/m", dummy=True)
    assert flags[:4] == ["--model-path", "/m", "--load-format", "dummy"]
    for flag, value in [("--attention-backend", "flashinfer"), ("--mm-attention-backend", "triton_attn"),
                        ("--grammar-backend", "none"), ("--cuda-graph-max-bs", "8")]:
        assert flags[flags.index(flag) + 1] == value
    assert "--enable-metrics" in flags and "--enable-cache-report" in flags
    assert "--load-format" not in launch.base_flags("/m", dummy=False)
    # gpu_env.sh's SERVER_FLAGS carries the same flag names (plus port/memory, which Server adds).
    env_sh = (Path(launch.__file__).parent / "gpu_env.sh").read_text()
    for flag in flags:
        if flag.startswith("--") and flag != "--enable-metrics":
            assert flag in env_sh, flag


def test_vlcache_flags_from_labels():
    assert launch.vlcache_flags("stock") == []
    assert launch.vlcache_flags("none") == ["--enable-vlcache", "--vlcache-policy", "none"]
    assert launch.vlcache_flags("first_k:16")[-2:] == ["--vlcache-first-k", "16"]
    assert launch.vlcache_flags("full:0.1")[-2:] == ["--vlcache-recompute-ratio", "0.1"]
    assert launch.vlcache_flags("vlcache:0.05:profile=./p.json:check-layer=2")[-6:] == [
        "--vlcache-recompute-ratio", "0.05", "--vlcache-profile", "./p.json", "--vlcache-check-layer", "2"]
    bare = launch.vlcache_flags("vlcache:0.05:profile=synthetic-7b-decreasing.json")[-1]
    assert bare.endswith("benchmarks/profiles/synthetic-7b-decreasing.json") and Path(bare).is_file()
    with pytest.raises(ValueError):
        launch.vlcache_flags(":3")
    with pytest.raises(ValueError, match="name=value"):
        launch.vlcache_flags("vlcache:0.05:profile")


def test_argv_adds_port_and_memory(tmp_path):
    s = launch.Server("x", ["--model-path", "/m"], 30123, tmp_path, mem_fraction=0.5)
    argv = s.argv()
    assert argv[:3] == [sys.executable, "-m", "sglang.launch_server"]
    assert argv[argv.index("--port") + 1] == "30123"
    assert argv[argv.index("--mem-fraction-static") + 1] == "0.5"
    assert "--mem-fraction-static" not in launch.Server("x", [], 1, tmp_path, mem_fraction=None).argv()
    assert s.url == "http://127.0.0.1:30123"
    assert s.log_path == tmp_path / "server_x.log"


def test_parse_vlcache_gauges():
    g = launch.parse_vlcache_gauges(METRICS_SAMPLE)
    assert g == {"key_hits": 12.0, "key_misses": 4.0, "key_mismatches": 0.0, "reused_tokens": 31680.0,
                 "recomputed_tokens": 1584.0, "store_tokens": 15840.0, "store_bytes": 884998144.0,
                 "hit_rate": 0.75, "recomputed_fraction": 0.05}
    assert launch.parse_vlcache_gauges("# only comments\nsglang:foo 1.0\n") == {}
    with pytest.raises(ValueError, match="unparseable"):
        launch.parse_vlcache_gauges("sglang:vlcache_key_hits\n")


def test_vlcache_gauges_of_dp_ranks_are_summed():
    two_ranks = textwrap.dedent("""\
        sglang:vlcache_key_hits{dp_rank="0"} 3.0
        sglang:vlcache_key_hits{dp_rank="1"} 9.0
        sglang:vlcache_key_misses{dp_rank="0"} 1.0
        sglang:vlcache_key_misses{dp_rank="1"} 3.0
        sglang:vlcache_hit_rate{dp_rank="0"} 0.75
        sglang:vlcache_hit_rate{dp_rank="1"} 0.75
        sglang:vlcache_reused_token_layers{dp_rank="0"} 100.0
        sglang:vlcache_reused_token_layers{dp_rank="1"} 300.0
        sglang:vlcache_recomputed_token_layers{dp_rank="0"} 0.0
        sglang:vlcache_recomputed_token_layers{dp_rank="1"} 100.0
        sglang:vlcache_recomputed_fraction{dp_rank="0"} 0.0
        sglang:vlcache_recomputed_fraction{dp_rank="1"} 0.3333
        """)
    g = launch.parse_vlcache_gauges(two_ranks)
    assert (g["key_hits"], g["key_misses"]) == (12.0, 4.0)
    assert g["hit_rate"] == 0.75, "a ratio of the sums, not a sum of ratios"
    assert g["recomputed_fraction"] == 0.25
    one = launch.parse_vlcache_gauges('sglang:vlcache_key_hits{dp_rank="0"} 3.0\nsglang:vlcache_hit_rate{dp_rank="0"} 0.5\n')
    assert one == {"key_hits": 3.0, "hit_rate": 0.5}, "one rank's samples as they are"


def test_gauge_deltas_are_window_rates():
    before = {"key_hits": 2, "key_misses": 6, "key_mismatches": 0, "reused_tokens": 1000, "recomputed_tokens": 0,
              "reused_token_layers": 28000, "recomputed_token_layers": 0}
    after = {"key_hits": 11, "key_misses": 9, "key_mismatches": 0, "reused_tokens": 5000,
             "recomputed_tokens": 4000, "store_tokens": 777, "store_bytes": 9,
             "reused_token_layers": 140000, "recomputed_token_layers": 11200}  # layer 0 in full, none after
    d = launch.gauge_deltas(before, after)
    assert d["hit_rate"] == pytest.approx(9 / 12)
    assert d["recomputed_fraction"] == pytest.approx(0.1)
    assert (d["store_tokens"], d["store_bytes"]) == (777, 9)
    stock = launch.gauge_deltas({}, {})
    assert stock["hit_rate"] is None and stock["recomputed_fraction"] is None


def test_exiting_command_raises_with_log_tail(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('CUDA out of memory (fake)'); sys.exit(3)"]
    s = launch.Server("dies", [], _free_port(), tmp_path, command=cmd, poll_s=0.05)
    with pytest.raises(RuntimeError, match=r"(?s)exited with code 3.*CUDA out of memory \(fake\)"):
        with s:
            pytest.fail("must not enter")
    assert s.proc is None


def test_timeout_stops_the_server(tmp_path):
    cmd = [sys.executable, "-c", "import time; print('loading', flush=True); time.sleep(60)"]
    s = launch.Server("slow", [], _free_port(), tmp_path, command=cmd, timeout_s=0.5, poll_s=0.05)
    s.start()
    pid = s.proc.pid
    with pytest.raises(RuntimeError, match=r"(?s)no /health after.*loading"):
        s.wait_healthy()
    assert s.proc is None and _gone(pid)


FAKE_SERVER = textwrap.dedent("""\
    import http.server, subprocess, sys
    port, body = int(sys.argv[1]), open(sys.argv[2]).read().encode()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # like the scheduler
    open(sys.argv[3], "w").write(str(child.pid))
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            out = {"/health": b"", "/metrics": body, "/server_info": b'{"max_total_num_tokens": 123}'}
            if self.path not in out:
                self.send_response(404); self.end_headers(); return
            self.send_response(200); self.end_headers(); self.wfile.write(out[self.path])
        def log_message(self, *a): pass
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
""")


def test_healthy_server_metrics_and_group_kill(tmp_path):
    (tmp_path / "fake.py").write_text(FAKE_SERVER)
    (tmp_path / "metrics.txt").write_text(METRICS_SAMPLE)
    servers = []
    for i in range(2):
        port = _free_port()
        cmd = [sys.executable, str(tmp_path / "fake.py"), str(port), str(tmp_path / "metrics.txt"),
               str(tmp_path / f"child{i}.pid")]
        servers.append(launch.Server(f"fake{i}", [], port, tmp_path, command=cmd, timeout_s=20, poll_s=0.05))
    with launch.running(servers):
        assert all(s.startup_s is not None for s in servers)
        assert servers[0].metrics()["hit_rate"] == 0.75
        assert servers[1].server_info()["max_total_num_tokens"] == 123
        children = [int((tmp_path / f"child{i}.pid").read_text()) for i in range(2)]
        assert all(_exists(c) for c in children)
    assert all(_gone(c) for c in children), "the whole process group is gone"
    assert all(s.proc is None for s in servers)


DRIVER = textwrap.dedent("""\
    import sys, time
    sys.path.insert(0, sys.argv[1])
    import launch
    launch.stop_servers_on_sigterm()
    fake, metrics, pid_file, port, log_dir = sys.argv[2:7]
    cmd = [sys.executable, fake, port, metrics, pid_file]
    server = launch.Server("fake", [], int(port), log_dir, command=cmd, timeout_s=20, poll_s=0.05)
    with launch.running([server]):
        print("serving", flush=True)
        time.sleep(60)
""")


def test_sigterm_to_the_driver_stops_its_servers(tmp_path):
    """What `timeout` does to serving.py: without the handler the fake server's group outlives it."""
    import signal
    import subprocess
    (tmp_path / "fake.py").write_text(FAKE_SERVER)
    (tmp_path / "metrics.txt").write_text(METRICS_SAMPLE)
    (tmp_path / "driver.py").write_text(DRIVER)
    bench = Path(launch.__file__).parent
    driver = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(bench), str(tmp_path / "fake.py"),
                               str(tmp_path / "metrics.txt"), str(tmp_path / "child.pid"), str(_free_port()),
                               str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert "serving" in [driver.stdout.readline().strip() for _ in range(2)]
        child = int((tmp_path / "child.pid").read_text())
        assert _exists(child)
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(timeout=30) == 128 + signal.SIGTERM
        assert _gone(child), "the server's process group went down with the driver"
    finally:
        driver.kill()


class _FakeServer:
    """Records start / wait_healthy / stop into a shared event list; may fail its health wait."""

    def __init__(self, label, events, fail=False):
        self.label, self.events, self.fail = label, events, fail

    def start(self):
        self.events.append(("start", self.label))

    def wait_healthy(self):
        self.events.append(("healthy", self.label))
        if self.fail:
            raise RuntimeError(f"{self.label} did not come up")

    def stop(self):
        self.events.append(("stop", self.label))


def test_all_start_before_any_health_wait_by_default():
    events = []
    servers = [_FakeServer(x, events) for x in "ab"]
    with launch.running(servers):
        events.append(("run", ""))
    assert events == [("start", "a"), ("start", "b"), ("healthy", "a"), ("healthy", "b"), ("run", ""),
                      ("stop", "a"), ("stop", "b")]


def test_first_server_comes_up_alone_then_the_rest_together_and_all_stop():
    events = []
    servers = [_FakeServer(x, events) for x in "abc"]
    with launch.running(servers, first_alone=True):
        events.append(("run", ""))
    assert events == [("start", "a"), ("healthy", "a"), ("start", "b"), ("start", "c"),
                      ("healthy", "b"), ("healthy", "c"), ("run", ""),
                      ("stop", "a"), ("stop", "b"), ("stop", "c")]


def test_work_between_the_first_start_and_the_rest_may_change_their_flags():
    events = []
    servers = [_FakeServer(x, events) for x in "ab"]

    def calibrate():
        events.append(("calibrate", ""))
        servers[1].flags = ["--vlcache-profile", "p.json"]

    with launch.running(servers, after_first_start=calibrate):
        events.append(("run", ""))
    assert events == [("start", "a"), ("calibrate", ""), ("start", "b"), ("healthy", "a"), ("healthy", "b"),
                      ("run", ""), ("stop", "a"), ("stop", "b")]
    assert servers[1].flags == ["--vlcache-profile", "p.json"]


def test_a_first_server_that_fails_stops_it_and_the_rest_never_start():
    events = []
    servers = [_FakeServer("a", events, fail=True), _FakeServer("b", events), _FakeServer("c", events)]
    with pytest.raises(RuntimeError, match="a did not come up"):
        with launch.running(servers, first_alone=True):
            events.append(("run", ""))
    assert ("run", "") not in events and ("start", "b") not in events
    assert events[-1:] == [("stop", "a")]


def test_a_later_server_that_fails_stops_every_started_one():
    events = []
    servers = [_FakeServer("a", events), _FakeServer("b", events, fail=True), _FakeServer("c", events)]
    with pytest.raises(RuntimeError, match="b did not come up"):
        with launch.running(servers, first_alone=True):
            events.append(("run", ""))
    assert ("run", "") not in events
    assert events[-3:] == [("stop", "a"), ("stop", "b"), ("stop", "c")]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not _is_zombie(pid)


def _gone(pid: int) -> bool:
    for _ in range(50):  # reaping of an orphan by init can lag a little
        if not _exists(pid):
            return True
        time.sleep(0.02)
    return False


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (FileNotFoundError, IndexError):
        return False


def test_a_port_already_answering_is_refused_before_launch(tmp_path):
    # A server left by an earlier run would pass our /health check and be measured under our label.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        s = launch.Server("late", [], port, tmp_path, command=[sys.executable, "-c", "pass"])
        with pytest.raises(RuntimeError, match=f"port {port} .* already in use"):
            s.start()
        assert s.proc is None


def _fake():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fake_sglang

    return fake_sglang


# ----- a client that goes away (benchmarks/soak.py's aborts), the leak grep ----------------------

def test_post_and_disconnect_resets_mid_stream_and_reports_a_server_that_finished_first():
    handler = _fake().make_handler()
    srv, url = _fake().serve(handler)
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    try:
        cut = launch.post_and_disconnect(url + "/v1/chat/completions", body, after_s=0.1, stream=True)
        assert cut["status"] == 200 and not cut["complete"] and cut["received"] > 0
        whole = launch.post_and_disconnect(url + "/v1/chat/completions", body, after_s=5, stream=True)
        assert whole["complete"]
        half = launch.post_and_disconnect(url + "/v1/chat/completions", body, after_s=1, half_body=True)
        assert half["status"] is None and half["received"] == 0
        deadline = time.monotonic() + 5
        while handler.gauges.get("aborted", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert handler.gauges.get("aborted") == 1, "the server saw the reset mid-stream"
        assert launch.http_get(url + "/health")[0] == 200
    finally:
        srv.shutdown()


def test_leak_reports_match_sglangs_idle_check_lines_only(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("ok\n[2026] token_to_kv_pool_allocator memory leak detected! available_size=3\n"
                   "KV double free: sub-pool 0 has 2 duplicate pages.\nWarning: NCCL leak at shutdown\n")
    got = launch.leak_reports(log)
    assert got["count"] == 2 and "memory leak detected" in got["lines"][0]
    assert launch.leak_reports(tmp_path / "missing.log")["count"] == 0
