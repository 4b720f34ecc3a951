"""A fake SGLang OpenAI server for the soak's dry runs: answers chat requests from the image bytes and
text (deterministic, so two fakes agree), refuses the soak's hostile inputs with SGLang-like 400
messages, streams slowly, keeps vlcache-like gauges and a per-salt image store (cached_tokens under the
override `none`), answers /flush_cache and /health. Faults for the tests that the soak catches them
are class attributes (see `Fake`).

In-process: `serve(make_handler(...))`; as a process (launch.Server's command):
`python fake_sglang.py PORT [--fault NAME ...]`, logging to stdout like a server.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import http.server
import io
import json
import re
import sys
import threading
import time
from typing import Optional
from typing import Optional

IMAGE_TOKENS = 64


class JsonHandler(http.server.BaseHTTPRequestHandler):
    """Quiet handler with one reply helper (the fakes of the soak and of the accuracy sweep)."""

    def log_message(self, *a):
        pass

    def _send(self, code: int, body, ctype: str = "application/json") -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class Fake(JsonHandler):
    protocol_version = "HTTP/1.1"
    # Faults (a subclass per test sets them):
    wrong_when_n2 = False  # n > 1 answers differ from the true answer (a vlcache bug the soak must catch)
    bomb_is_500 = False  # a decompression bomb is an internal error (the bug issue 12 found)
    junk_served_when_cached = False  # junk base64 of a stored image answers 200 (REVIEW F11)
    reuse_across_salts = False  # the store ignores the salt
    leak_line = False  # print SGLang's leak report once the stream is over (on the first idle flush after)
    health_fails = 0  # the first N /health polls after the first chat request answer 503
    store_images = 6  # images the store holds before it evicts the oldest (per DP rank)
    dp_size = 1  # what /server_info reports
    model_id = "fake/Qwen2.5-VL-7B-Instruct"  # what /v1/models answers (SGLang: the served model name)
    # State (a subclass per server gets its own):
    store: dict = {}
    gauges: dict = {}
    inflight = 0
    lock = threading.Lock()
    chats = 0

    def _error(self, message: str, code: int = 400) -> None:
        self._send(code, json.dumps({"object": "error", "message": message, "type": "BadRequest", "param": None,
                                     "code": code}))

    def _count(self, name: str, n: float = 1, rank: Optional[int] = None) -> None:
        """A gauge; under --dp-size one per rank (the key (name, rank)), as the real schedulers publish."""
        g = type(self).gauges
        key = name if rank is None else (name, rank)
        g[key] = g.get(key, 0) + n

    # ----- GET -----
    def do_GET(self):
        if self.path == "/health":
            cls = type(self)
            with cls.lock:
                fail = cls.chats > 0 and cls.health_fails > 0
                if fail:
                    cls.health_fails -= 1
            return self._send(503 if fail else 200, "", "text/plain")
        if self.path == "/v1/models":  # what SGLang's router (smg) probes to register a worker
            return self._send(200, json.dumps({"object": "list", "data": [
                {"id": self.model_id, "object": "model", "owned_by": "sglang", "root": self.model_id}]}))
        if self.path in ("/server_info", "/model_info"):
            return self._send(200, json.dumps({"model_path": self.model_id, "dp_size": self.dp_size,
                                               "is_generation": True, "has_image_understanding": True}))
        if self.path == "/metrics":
            with self.lock:
                text = "".join(f"sglang:vlcache_{k[0]}{{dp_rank=\"{k[1]}\"}} {float(v)}\n" if isinstance(k, tuple)
                               else f"sglang:vlcache_{k} {float(v)}\n" for k, v in self.gauges.items())
            return self._send(200, text, "text/plain")
        self._send(404, "not found", "text/plain")

    # ----- POST -----
    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        cls = type(self)
        if self.path.startswith("/flush_cache"):
            with cls.lock:
                busy = cls.inflight > 0 and "timeout=" not in self.path
                if not busy:
                    cls.store = {}
            if busy:
                return self._send(400, "Cache not flushed: requests are running.", "text/plain")
            if cls.leak_line and cls.chats > 0:
                print("ValueError: token_to_kv_pool_allocator memory leak detected! available_size=1", flush=True)
            return self._send(200, "Cache flushed.", "text/plain")
        if self.path != "/v1/chat/completions":
            return self._send(404, "not found", "text/plain")
        with cls.lock:
            cls.inflight += 1
            cls.chats += 1
        try:
            self._chat(json.loads(raw))
        finally:
            with cls.lock:
                cls.inflight -= 1

    def _chat(self, body: dict) -> None:
        override = (body.get("custom_params") or {}).get("vlcache")
        if override is not None:
            if override.get("policy", "full") not in ("full", "none", "first_k"):
                return self._error(f"custom_params.vlcache.policy {override['policy']!r} is unknown; choose one of "
                                   "['full', 'none', 'first_k']")
            ratio = override.get("recompute_ratio", 0)
            if not 0 <= ratio <= 1:
                return self._error(f"custom_params.vlcache.recompute_ratio must be in [0, 1], got {ratio}")
        texts, urls = [], []
        for m in body["messages"]:
            content = m["content"]
            if isinstance(content, str):
                texts.append(content)
                continue
            for c in content:
                if c["type"] == "text":
                    texts.append(c["text"])
                else:
                    urls.append(c["image_url"]["url"])
        salt = body.get("cache_salt")
        payloads = []
        for i, url in enumerate(urls):
            data, err = self._load(i, url)
            if err:
                code = 500 if (self.bomb_is_500 and "decompression bomb" in err) else 400
                with self.lock:
                    stored = {k[1] for k in self.store}
                if self.junk_served_when_cached and err.startswith("image payload is not valid base64") \
                        and _fix(url) in stored:
                    data, err = b"junk-but-cached", None
                else:
                    return self._error(err, code)
            payloads.append(data)
        cached = 0
        # Under --dp-size each rank has its own store (smg's --dp-aware sends the rank in the body).
        rank = body.get("routed_dp_rank", body.get("data_parallel_rank")) if self.dp_size > 1 else None
        with self.lock:
            for data in payloads:
                key = (None if self.reuse_across_salts else salt, hashlib.sha256(data).hexdigest(), rank)
                if key in self.store:
                    self._count("key_hits", rank=rank)
                    if (override or {}).get("policy") == "none":
                        cached += IMAGE_TOKENS
                else:
                    self._count("key_misses", rank=rank)
                    self.store[key] = True
                    self._count("stored_images", rank=rank)
                    mine = [k for k in self.store if k[2] == rank]
                    if len(mine) > self.store_images:
                        self.store.pop(mine[0])
                        self._count("evicted_images", rank=rank)
        answer = "a" + hashlib.sha256(b"|".join(payloads) + "|".join(texts).encode()).hexdigest()[:6]
        n = int(body.get("n") or 1)
        if body.get("stream"):
            return self._stream(answer)
        choices = []
        for i in range(n):
            text = answer + ("x" if self.wrong_when_n2 and n > 1 and i == 1 else "")
            choice = {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            if body.get("logprobs"):  # one token: the whole answer, 3 nats ahead of the runner-up
                top = [{"token": text, "logprob": -0.01}, {"token": "other", "logprob": -3.01}]
                choice["logprobs"] = {"content": [{"token": text, "logprob": -0.01, "top_logprobs": top}]}
            choices.append(choice)
        self._send(200, json.dumps({"choices": choices, "usage": {"prompt_tokens": 100, "completion_tokens": 2,
                                                                  "prompt_tokens_details": {"cached_tokens": cached}}}))

    def _stream(self, answer: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            for _ in range(30):  # ~0.6 s: long enough for the soak's aborts to land mid-stream
                self.wfile.write(f"data: {json.dumps({'choices': [{'delta': {'content': answer}}]})}\n\n".encode())
                self.wfile.flush()
                time.sleep(0.02)
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            self._count("aborted")
        self.close_connection = True

    def _load(self, i: int, url: str) -> tuple[Optional[bytes], Optional[str]]:
        """(bytes, None) or (None, the 400 message SGLang + vlcache give)."""
        from PIL import Image

        where = f"an image of the request could not be decoded: An exception occurred while loading IMAGE data at " \
                f"index {i}: Error while loading data {url[:100]}...: "
        if url.startswith(("http://", "https://")):
            if "127.0.0.1" in url:
                return None, where + "Max retries exceeded (NewConnectionError: [Errno 111] Connection refused)"
            return None, where + "NameResolutionError: Failed to resolve the host"
        if url.startswith(("file://", "/")):
            path = url[len("file://"):] if url.startswith("file://") else url
            return None, f"local image {path!r}: only absolute paths of regular files are read"
        if url.startswith("data:") and "," not in url:
            return None, "malformed data URL: expected 'data:<mime>;base64,<payload>'"
        payload = url.split(",", 1)[1] if url.startswith("data:") else url
        try:
            data = base64.b64decode(payload.encode("ascii"), validate=True)
        except (binascii.Error, ValueError, UnicodeEncodeError) as e:
            return None, f"image payload is not valid base64: {e}"
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except Image.DecompressionBombError as e:
            return None, where + str(e)
        except Exception as e:  # noqa: BLE001 - PIL's decode errors
            return None, where + str(e)
        w, h = img.size
        if max(w, h) / min(w, h) > 200:
            return None, f"absolute aspect ratio must be smaller than 200, got {max(w, h) / min(w, h)}"
        return data, None


def _fix(url: str) -> str:
    """The digest of what junk base64 was made from (its valid twin): drop the soak's inserted junk."""
    payload = url.split(",", 1)[1] if url.startswith("data:") else url
    clean = re.sub(r"[^A-Za-z0-9+/=]", "", payload)
    try:
        return hashlib.sha256(base64.b64decode(clean)).hexdigest()
    except (binascii.Error, ValueError):
        return ""


def make_handler(**faults) -> type:
    """A fresh handler class (own store, gauges and lock) with the given faults."""
    return type("FakeSGLang", (Fake,), {"store": {}, "gauges": {}, "lock": threading.Lock(), "inflight": 0,
                                        "chats": 0, **faults})


class QuietServer(http.server.ThreadingHTTPServer):
    request_queue_size = 128
    daemon_threads = True

    def handle_error(self, request, client_address):  # clients that reset the connection (the aborts)
        pass


def serve(handler: type, port: int = 0) -> tuple[QuietServer, str]:
    srv = QuietServer(("127.0.0.1", port), handler)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


if __name__ == "__main__":
    port = int(sys.argv[1])
    args = sys.argv[2:]
    faults: dict = {}
    while args:  # --fault NAME (a fault on) | --store-images N | --dp-size N
        flag, value, *args = args
        if flag == "--fault":
            faults[value] = True
        elif flag in ("--store-images", "--dp-size"):
            faults[flag[2:].replace("-", "_")] = int(value)
        else:
            sys.exit(f"unknown option {flag!r}: expected --fault NAME, --store-images N or --dp-size N")
    srv = QuietServer(("127.0.0.1", port), make_handler(**faults))
    print(f"fake SGLang serving on {port}", flush=True)
    srv.serve_forever(poll_interval=0.02)
