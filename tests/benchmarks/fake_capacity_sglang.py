"""A fake SGLang server for compression_speed's dry runs: a KV pool that holds CAP_UNCOMPRESSED requests
at alpha 1.0 and CAP_COMPRESSED at a lower per-request `custom_params.vlcache.compress_ratio`; requests
past it wait. It streams one chunk per token, logs SGLang-like "Prefill batch" / "Decode batch" lines,
serves `sglang:num_running_reqs` / `num_queue_reqs` and the compression gauges on /metrics, answers
/abort_request (abort_all), /flush_cache (refused while requests run), /server_info, /health.

    python fake_capacity_sglang.py PORT
"""

from __future__ import annotations

import http.server
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fake_sglang  # noqa: E402  (the quiet handler and its reply helper)

POOL = 4000
CAP_UNCOMPRESSED, CAP_COMPRESSED = 3, 100
TOKENS = {True: 100, False: 1000}  # prompt tokens a request holds, compressed or not
STEP_S = 0.01

lock = threading.Condition()
state = {"running": 0, "waiting": 0, "held": 0, "aborted": False, "compressed": 0, "freed": 0}


def alpha_of(body: dict) -> float:
    return float(((body.get("custom_params") or {}).get("vlcache") or {}).get("compress_ratio", 1.0))


def decode_logger() -> None:
    while True:
        time.sleep(0.05)
        with lock:
            if state["running"]:
                print(f"[fake] Decode batch, #running-req: {state['running']}, #token: {state['held']}, "
                      f"token usage: {state['held'] / POOL:.2f}, gen throughput (token/s): 1.0, ", flush=True)


class Handler(fake_sglang.JsonHandler):
    def _send(self, code: int, body, ctype: str = "text/plain") -> None:  # plain text unless told
        super()._send(code, body, ctype)

    def do_GET(self):
        if self.path == "/health":
            return self._send(200, "")
        if self.path == "/server_info":
            return self._send(200, json.dumps({"max_total_num_tokens": POOL}), "application/json")
        if self.path == "/metrics":
            with lock:
                s = dict(state)
            return self._send(200, f'sglang:num_running_reqs{{model_name="m"}} {s["running"]}\n'
                                   f'sglang:num_queue_reqs{{model_name="m"}} {s["waiting"]}\n'
                                   f'sglang:vlcache_compressed_requests {s["compressed"]}\n'
                                   f'sglang:vlcache_compress_freed_slots {s["freed"]}\n')
        self._send(404, "not found")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if self.path == "/flush_cache":
            with lock:
                busy = state["running"] or state["waiting"]
                if not busy:
                    state["aborted"] = False
            return self._send(400 if busy else 200, "busy" if busy else "flushed")
        if self.path == "/abort_request":
            with lock:
                state["aborted"] = body.get("abort_all", False) or state["aborted"]
                lock.notify_all()
            return self._send(200, "")
        if self.path == "/v1/chat/completions":
            return self._chat(body)
        self._send(404, "not found")

    def _chat(self, body: dict) -> None:
        compressed = alpha_of(body) < 1.0
        cap = CAP_COMPRESSED if compressed else CAP_UNCOMPRESSED
        with lock:
            state["waiting"] += 1
            print(f"[fake] Prefill batch, #new-seq: 1, #running-req: {state['running']}, "
                  f"#queue-req: {state['waiting']}, ", flush=True)
            while state["running"] >= cap and not state["aborted"]:
                lock.wait(0.05)
            state["waiting"] -= 1
            state["running"] += 1
            state["held"] += TOKENS[compressed]
            if compressed:
                state["compressed"] += 1
                state["freed"] += TOKENS[False] - TOKENS[True]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            for _ in range(int(body.get("max_tokens") or 1)):
                with lock:
                    if state["aborted"]:
                        break
                self.wfile.write(f"data: {json.dumps({'choices': [{'delta': {'content': 'x'}}]})}\n\n".encode())
                self.wfile.flush()
                time.sleep(STEP_S)
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            with lock:
                state["running"] -= 1
                state["held"] -= TOKENS[compressed]
                lock.notify_all()
        self.close_connection = True


if __name__ == "__main__":
    threading.Thread(target=decode_logger, daemon=True).start()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    srv.daemon_threads = True
    srv.request_queue_size = 128
    print(f"fake SGLang (capacity) serving on {sys.argv[1]}", flush=True)
    srv.serve_forever(poll_interval=0.02)
