"""serve_eval's server flags, calibration fallback and the sweep command (the servers run on the GPU host)."""

import argparse
import sys
from pathlib import Path

from benchmarks.tiny_vlm import serve_eval

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
import launch  # noqa: E402


def test_one_stock_and_one_vlcache_server_flags():
    flags = serve_eval.server_flags("/ckpt", 1000)
    assert flags[:2] == ["--model-path", "/ckpt"] and "--load-format" not in flags
    assert flags[flags.index("--max-total-tokens") + 1] == "1000" and "--disable-cuda-graph" in flags
    vl = serve_eval.vlcache_server_flags("vlcache", "--vlcache-blend-score v")
    assert vl == ["--enable-vlcache", "--vlcache-policy", "vlcache", "--vlcache-blend-score", "v"]


def test_calibration_command_and_failure_is_reported_not_raised(tmp_path, monkeypatch):
    cmd = serve_eval.calibrate_command("/ckpt", "req.jsonl", "p.json")
    assert cmd[1:] == ["-m", "vlcache_sglang.calibrate", "--model", "/ckpt", "--requests", "req.jsonl",
                       "--out", "p.json", "--device", "cuda"]
    monkeypatch.setattr(serve_eval, "calibrate_command",
                        lambda *a: [sys.executable, "-c", "import sys; print('no GPU here'); sys.exit(2)"])
    ok, line = serve_eval.calibrate("/ckpt", "r", str(tmp_path / "p.json"), tmp_path / "cal.log", 30)
    assert not ok and "exit 2" in line and "no GPU here" in line
    monkeypatch.setattr(serve_eval, "calibrate_command",
                        lambda m, r, prof: [sys.executable, "-c", f"open({prof!r}, 'w').write('{{}}')"])
    ok, line = serve_eval.calibrate("/ckpt", "r", str(tmp_path / "p.json"), tmp_path / "cal.log", 30)
    assert ok and "p.json" in line


def test_sweep_argv_names_every_set(tmp_path):
    args = argparse.Namespace(data_dir=str(tmp_path), sets="A,B,multi", knob_sets="mix-0.5", out_dir="o",
                              deadline_unix=123.0, progress="p.log", sweep_args="--fractions 0,5 --concurrency 8")
    stock = launch.Server("stock", [], 30100, tmp_path)
    vl = launch.Server("vlcache", [], 30101, tmp_path)
    argv = serve_eval.sweep_argv(args, stock, vl)
    assert argv[:7] == ["sweep", "--vlcache", "http://127.0.0.1:30101", "--stock", "http://127.0.0.1:30100",
                        "--out-dir", "o"]
    assert f"A={tmp_path / 'A.jsonl'}" in argv and f"mix-0.5={tmp_path / 'mix-0.5.jsonl'}" in argv
    assert argv[argv.index(f"mix-0.5={tmp_path / 'mix-0.5.jsonl'}") - 1] == "--knob-dataset"
    assert argv[-4:] == ["--fractions", "0,5", "--concurrency", "8"]
    assert argv[argv.index("--deadline-unix") + 1] == "123.0"
    accuracy_args = __import__("accuracy").parse_sweep_args(argv[1:])
    assert [n for n, _ in accuracy_args.sets] == ["A", "B", "multi"]


def test_restarter_keeps_the_crashed_log_and_brings_the_server_back(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = ("import http.server, sys; print('serving', flush=True)\n"
            "class H(http.server.BaseHTTPRequestHandler):\n"
            "    def do_GET(self): self.send_response(200); self.end_headers()\n"
            "    def log_message(self, *a): pass\n"
            f"http.server.HTTPServer(('127.0.0.1', {port}), H).serve_forever()\n")
    server = launch.Server("vlcache", [], port, tmp_path, command=[sys.executable, "-c", code], timeout_s=20,
                           poll_s=0.05)
    with launch.running([server]):
        first = server.proc.pid
        serve_eval.restarter(server)()
        assert server.proc.pid != first and server.startup_s is not None
        assert launch.http_get(server.url + "/health")[0] == 200
    assert (tmp_path / "server_vlcache.crash1.log").read_text().startswith("serving")
    assert "server_vlcache.crash1" in serve_eval.log_tails([server])


def test_accuracy_bench_script_parses_and_passes_serve_eval_known_options():
    import re
    import subprocess

    script = Path(__file__).resolve().parents[3] / "benchmarks" / "accuracy_bench.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    call = text[text.index("python3 -m benchmarks.tiny_vlm.serve_eval"):]
    call = call[:call.index(">\"$OUT/sweep.log\"")]
    own, sweep = call.split("--sweep-args", 1)
    for flags, module in ((own + "--sweep-args", serve_eval), (sweep, __import__("accuracy"))):
        source = Path(module.__file__).read_text()
        for flag in re.findall(r"(--[a-z][a-z-]+)", flags):
            assert f'"{flag}"' in source, f"accuracy_bench.sh passes {flag}, which {module.__name__} does not take"
