"""A stand-in for SGLang's router (`python -m smg.launch_router`) in the affinity benchmark's tests,
where smg is not installed: the same flags (--host --port --worker-urls --policy --assignment-mode),
/health, and a proxy that picks a worker per request. `manual` pins each X-SMG-Routing-Key to the
worker holding the fewest keys (smg's min_group, counted over pinned keys); requests without a key
and every other policy go round robin. --dp-aware: one worker per rank of each URL (its /server_info
dp_size), the rank written into the body as smg does (`data_parallel_rank`).

    python fake_router.py --host 127.0.0.1 --port 30300 --worker-urls http://... http://... --policy manual
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import itertools
import json
import threading
import urllib.parse


def make_handler(workers: list[str], policy: str) -> type:
    """workers: URLs, or "URL@rank" under --dp-aware."""
    pins: dict[str, str] = {}
    lock = threading.Lock()
    turn = itertools.cycle(workers)

    def pick(key: str | None) -> str:
        with lock:
            if policy != "manual" or not key:
                return next(turn)
            if key not in pins:
                counts = {w: 0 for w in workers}
                for w in pins.values():
                    counts[w] += 1
                pins[key] = min(workers, key=lambda w: (counts[w], workers.index(w)))
            return pins[key]

    class Proxy(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):
            if self.path == "/health":
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")
                return
            self._forward(b"")

        def do_POST(self):
            self._forward(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

        def _forward(self, body: bytes) -> None:
            url, _, rank = pick(self.headers.get("X-SMG-Routing-Key")).partition("@")
            if rank and body:
                body = json.dumps({**json.loads(body), "data_parallel_rank": int(rank)}).encode()
            u = urllib.parse.urlsplit(url)
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
            conn.request(self.command, self.path, body or None, headers)
            resp = conn.getresponse()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("content-length", "connection", "transfer-encoding"):
                    self.send_header(k, v)
            self.send_header("Connection", "close")  # relay until the worker closes
            self.end_headers()
            while chunk := resp.read1(65536):
                self.wfile.write(chunk)
                self.wfile.flush()
            conn.close()
            self.close_connection = True

    return Proxy


def _dp_size(url: str) -> int:
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request("GET", "/server_info")
    return int(json.loads(conn.getresponse().read()).get("dp_size") or 1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--worker-urls", nargs="+", required=True)
    p.add_argument("--policy", default="cache_aware")
    p.add_argument("--assignment-mode", default="random")
    p.add_argument("--dp-aware", action="store_true")
    args, _ = p.parse_known_args()
    workers = args.worker_urls
    if args.dp_aware:
        workers = [f"{u}@{r}" for u in workers for r in range(_dp_size(u))]
    srv = http.server.ThreadingHTTPServer((args.host, args.port), make_handler(workers, args.policy))
    srv.daemon_threads = True
    print(f"fake router on {args.port}: {args.policy} over {args.worker_urls}", flush=True)
    srv.serve_forever(poll_interval=0.05)


if __name__ == "__main__":
    main()
