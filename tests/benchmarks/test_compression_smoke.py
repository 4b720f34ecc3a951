"""compression_smoke.py against a fake compressing server: the checks pass and can fail."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fake_sglang  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import compression_smoke  # noqa: E402


def _fake(frees: bool) -> type:
    class Compressing(fake_sglang.JsonHandler):
        lock, counts = threading.Lock(), {"compressed_requests": 0, "compress_freed_slots": 0}

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            alpha = body["custom_params"]["vlcache"]["compress_ratio"]
            if alpha < 1:
                with self.lock:
                    self.counts["compressed_requests"] += 1
                    self.counts["compress_freed_slots"] += 100 if frees else 0
            text = body["messages"][0]["content"][0]["text"] + (" (compressed)" if alpha < 1 else "")
            self._send(200, json.dumps({"choices": [{"message": {"content": text}}], "usage": {}}))

        def do_GET(self):
            if self.path == "/metrics":
                with self.lock:
                    return self._send(200, "".join(f"sglang:vlcache_{k} {v}\n" for k, v in self.counts.items()),
                                      "text/plain")
            self._send(200, "", "text/plain")

    return Compressing


def test_the_smoke_passes_on_a_server_that_compresses_and_fails_on_one_that_frees_nothing(monkeypatch):
    # Small images: the checks do not depend on the resolution, and the CPU need not encode 4K PNGs.
    monkeypatch.setattr(compression_smoke, "photo_data_url", lambda w, h, seed: f"data:image/png;base64,{seed}")
    for frees in (True, False):
        srv, url = fake_sglang.serve(_fake(frees))
        try:
            report = compression_smoke.run(url, max_tokens=4)
        finally:
            srv.shutdown()
        assert report["checks"]["every request 200"] and report["checks"]["alpha 1.0 repeats its answer"]
        assert report["checks"]["alpha 0.1 requests compressed"] and report["gauges_delta"]["compressed_requests"] == 8
        assert report["passed"] is frees and report["checks"]["slots freed"] is frees
