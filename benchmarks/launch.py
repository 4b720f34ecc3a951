"""Start SGLang servers from Python for the benchmarks: one process group per server, /health polling,
the `sglang:vlcache_*` gauges of /metrics.

    from launch import Server, base_flags
    flags = base_flags("/tmp/Qwen2.5-VL-7B-Instruct", dummy=True)
    with Server("first_k", flags + ["--enable-vlcache", "--vlcache-policy", "first_k"], 30001, out_dir) as srv:
        srv.url, srv.metrics()

Scripts import it with benchmarks/ on sys.path (they run from the repo root as `python3 benchmarks/x.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

GAUGE_PREFIX = "sglang:vlcache_"
# One sample line of the Prometheus text format: name, optional {labels}, value, optional timestamp.
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)(\s+\S+)?\s*$")


def base_flags(model_path: str, dummy: bool = True) -> list[str]:
    """The flags of benchmarks/gpu_env.sh's SERVER_FLAGS plus --enable-metrics, without port and
    memory fraction (Server adds those)."""
    flags = ["--model-path", model_path]
    if dummy:
        flags += ["--load-format", "dummy"]
    return flags + ["--attention-backend", "flashinfer", "--mm-attention-backend", "triton_attn",
                    "--grammar-backend", "none", "--enable-cache-report", "--enable-metrics",
                    "--cuda-graph-max-bs", "8"]


# What compression's start-up checks ask for (setup_checks.check_compression) and the split count
# they advise (compression_decode_advice). Servers compared with a compressing one run them too: the
# same decode kernel and schedule.
COMPRESSION_DECODE_FLAGS = ["--decode-attention-backend", "triton", "--disable-overlap-schedule",
                            "--triton-attention-num-kv-splits", "64"]


def vlcache_flags(spec: str) -> list[str]:
    """Server flags for a label `stock`, `POLICY`, `POLICY:PARAM` or `POLICY:PARAM:name=value...`
    (PARAM is K for first_k, the recompute ratio for other policies; each name=value adds
    --vlcache-name value): `first_k:16` -> --enable-vlcache --vlcache-policy first_k --vlcache-first-k
    16; `vlcache:0.05:profile=p.json` adds --vlcache-profile p.json."""
    if spec == "stock":
        return []
    policy, _, rest = spec.partition(":")
    if not policy:
        raise ValueError(f"empty policy in {spec!r}")
    param, *extras = rest.split(":") if rest else [""]
    flags = ["--enable-vlcache", "--vlcache-policy", policy]
    if param:
        flags += ["--vlcache-first-k" if policy == "first_k" else "--vlcache-recompute-ratio", param]
    for extra in extras:
        name, eq, value = extra.partition("=")
        if not name or not eq:
            raise ValueError(f"expected name=value after the parameter in {spec!r}, got {extra!r}")
        if name == "profile" and "/" not in value:  # a bare name: one of benchmarks/profiles/
            value = str(Path(__file__).resolve().parent / "profiles" / value)
        flags += [f"--vlcache-{name}", value]
    return flags


def parse_vlcache_gauges(text: str) -> dict[str, float]:
    """`sglang:vlcache_<name>` samples of a /metrics body as {name: value} (prefix stripped).

    One scheduler per DP rank publishes (label `dp_rank`, vlcache_sglang/metrics.py): each count is
    summed over the ranks and the ratios (hit_rate, recomputed_fraction, ...) are recomputed from the
    sums. One rank (one GPU, TP) gives its samples as they are.
    """
    series: dict[str, list[float]] = {}
    for name, value in _samples(text, GAUGE_PREFIX):
        series.setdefault(name, []).append(value)
    sums = {name: sum(values) for name, values in series.items()}
    if all(len(values) == 1 for values in series.values()):
        return sums
    from vlcache_sglang.stats import VLCacheStats

    counts = {f.name: int(sums[f.name]) for f in dataclasses.fields(VLCacheStats) if f.name in sums}
    ratios = {k: v for k, v in VLCacheStats(**counts).as_dict().items() if k not in counts}
    return {**sums, **{k: v for k, v in ratios.items() if k in sums}}


def parse_gauges(text: str, prefix: str) -> dict[str, float]:
    """Samples of a /metrics body whose name starts with `prefix`, as {name without it: value}
    (labels ignored, a later sample of a name wins: one scheduler, one sample)."""
    return dict(_samples(text, prefix))


def _samples(text: str, prefix: str) -> Iterator[tuple[str, float]]:
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue  # comments (# HELP / # TYPE) and other metrics
        m = _SAMPLE.match(line.strip())
        if m is None:
            raise ValueError(f"unparseable metrics line: {line!r}")
        yield m.group(1)[len(prefix):], float(m.group(3))


def http_get(url: str, timeout_s: float = 10.0) -> tuple[int, str]:
    """(status, body); status 0 when nothing answers (connection refused, reset, timeout)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0, ""


def http_post(url: str, body: Optional[dict] = None, timeout_s: float = 30.0) -> tuple[int, str]:
    """POST a JSON body (or none); (status, body), status 0 when nothing answers."""
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0, ""


def post_and_disconnect(url: str, body: dict, after_s: float, stream: bool = False,
                        half_body: bool = False) -> dict:
    """A client that goes away: POST `body` as JSON over a raw socket, read the answer for `after_s`,
    then reset the connection (SO_LINGER 0, as a killed client does). half_body: send half the body
    and reset (the server never gets a whole request). `stream` only names what the body asks for.
    Returns {"status": the status line's code or None, "received": bytes, "complete": True when the
    server finished (closed, or sent the stream's [DONE]) before we went away}."""
    u = urllib.parse.urlsplit(url)
    data = json.dumps(body).encode()
    head = (f"POST {u.path or '/'} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode()
    got, complete = b"", False
    with socket.create_connection((u.hostname, u.port or 80), timeout=10) as sock:
        sock.sendall(head + (data[: len(data) // 2] if half_body else data))
        end = time.monotonic() + after_s
        while not half_body and (left := end - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except (socket.timeout, OSError):
                break
            if not chunk:
                complete = True
                break
            got += chunk
            if b"data: [DONE]" in got:
                complete = True
                break
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    m = re.match(rb"HTTP/1\.[01] (\d{3})", got)
    return {"status": int(m.group(1)) if m else None, "received": len(got), "complete": complete,
            "stream": stream}


# SGLang's idle invariant reports (scheduler_components/invariant_checker.py); a bare "leak" also matches
# torch's NCCL shutdown warning. Under SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE=1 each one raises.
LEAK_PATTERN = re.compile(r"memory leak detected|KV double free|use-after-free")


def leak_reports(path: Path, max_lines: int = 50) -> dict:
    """The leak-report lines of a server log: {"count", "lines" (the first max_lines), "log"}."""
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return {"count": 0, "lines": [], "log": f"{path} (missing)"}
    hits = [line for line in text.splitlines() if LEAK_PATTERN.search(line)]
    return {"count": len(hits), "lines": hits[:max_lines], "log": str(path)}


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


@dataclasses.dataclass
class Server:
    label: str
    flags: list[str]
    port: int
    log_dir: str | Path
    mem_fraction: Optional[float] = 0.7
    timeout_s: float = 300.0
    host: str = "127.0.0.1"
    command: Optional[list[str]] = None  # replaces the whole launch command (tests, other launchers)
    poll_s: float = 2.0

    def __post_init__(self) -> None:
        self.log_path = Path(self.log_dir) / f"server_{self.label}.log"
        self.proc: Optional[subprocess.Popen] = None
        self.startup_s: Optional[float] = None
        self._t0 = 0.0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def argv(self) -> list[str]:
        if self.command is not None:
            return list(self.command)
        argv = [sys.executable, "-m", "sglang.launch_server", *self.flags, "--host", self.host,
                "--port", str(self.port)]
        if self.mem_fraction is not None:
            argv += ["--mem-fraction-static", str(self.mem_fraction)]
        return argv

    def start(self) -> None:
        """Launch without waiting. Its own session, so stop() can kill the scheduler and detokenizer
        children with the group."""
        if self.proc is not None:
            return
        if port_in_use(self.host, self.port):
            # Something else answers there (a server left by an earlier run): its /health would pass
            # for ours and its numbers would be filed under this label.
            raise RuntimeError(f"server {self.label}: port {self.port} on {self.host} is already in use")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self._t0 = time.monotonic()

    def wait_healthy(self) -> float:
        """Seconds from start to the first 200 of /health; RuntimeError with the log tail if the
        process exits or the timeout passes (the server is stopped then)."""
        assert self.proc is not None, "start() first"
        if self.startup_s is not None:
            return self.startup_s
        while True:
            if http_get(self.url + "/health", timeout_s=5)[0] == 200:
                self.startup_s = time.monotonic() - self._t0
                print(f"server {self.label}: healthy after {self.startup_s:.0f} s ({self.url})", flush=True)
                return self.startup_s
            code = self.proc.poll()
            if code is not None:
                self.stop()  # children of the group may outlive the leader
                raise RuntimeError(f"server {self.label} exited with code {code} before /health answered; "
                                   f"{self.log_path} ends:\n{tail(self.log_path)}")
            if time.monotonic() - self._t0 > self.timeout_s:
                self.stop()
                raise RuntimeError(f"server {self.label}: no /health after {self.timeout_s:.0f} s; "
                                   f"{self.log_path} ends:\n{tail(self.log_path)}")
            time.sleep(self.poll_s)

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the group, SIGKILL what is left, and wait until no process of the group remains
        (so the GPU memory is free for the next server)."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the leader's pid is the group id
        _signal_group(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(pgid, signal.SIGKILL)
        self.proc.wait()
        deadline = time.monotonic() + 15
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.proc = None

    def metrics(self) -> dict[str, float]:
        """The vlcache gauges now ({} for a stock server or one without --enable-metrics)."""
        status, body = http_get(self.url + "/metrics")
        if status != 200:
            raise RuntimeError(f"server {self.label}: GET /metrics answered {status}")
        return parse_vlcache_gauges(body)

    def server_info(self) -> dict:
        """/server_info (SGLang 0.5.16; /get_server_info is its deprecated alias)."""
        status, body = http_get(self.url + "/server_info", timeout_s=30)
        if status != 200:
            raise RuntimeError(f"server {self.label}: GET /server_info answered {status}")
        return json.loads(body)

    def __enter__(self) -> "Server":
        self.start()
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> bool:
    """Send sig to the group; False if no process of it is left."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # a zombie leader on some systems: the group still exists
        return True


def _group_alive(pgid: int) -> bool:
    """Any process of the group that is not a zombie (zombies hold no GPU memory; an orphan's may
    wait a while for init to reap it)."""
    if not os.path.isdir("/proc"):
        return _signal_group(pgid, 0)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"
        except (OSError, IndexError):
            continue  # exited while we looked
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def stop_servers_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so `with Server` / `running()` stop their servers on the way out.
    `timeout` and the GPU host's time limit send SIGTERM; the servers run in their own process groups
    and otherwise outlive us, holding most of the GPU's memory while the next command measures."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def stop_all(servers: Sequence[Server]) -> None:
    for s in servers:
        s.stop()


@contextlib.contextmanager
def running(servers: Sequence[Server], first_alone: bool = False,
            after_first_start: Optional[Callable[[], None]] = None) -> Iterator[Sequence[Server]]:
    """`with running([...]) as servers:` start them all (small models fit side by side), wait for
    every /health, and stop every started one on the way out, or at once if one fails to come up.

    first_alone: the first comes up before the others start, filling the FlashInfer/Triton kernel
    caches that the others then load instead of all compiling at once.
    after_first_start: called once the first has started (and, with first_alone, is healthy), before
    the others start: work that overlaps the first's start-up and that the others' flags depend on
    (accuracy_bench: calibration, whose profile the vlcache server loads). It may change their flags."""
    started: list[Server] = []
    try:
        if first_alone or after_first_start is not None:
            head, rest = list(servers[:1]), list(servers[1:])
            for s in head:
                started.append(s)
                s.start()
            if first_alone:
                for s in head:
                    s.wait_healthy()
            if after_first_start is not None:
                after_first_start()
            for s in rest:
                started.append(s)
                s.start()
            for s in (rest if first_alone else head + rest):
                s.wait_healthy()
        else:
            for s in servers:
                started.append(s)
                s.start()
            for s in servers:
                s.wait_healthy()
        yield servers
    finally:
        stop_all(started)


def gauge_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, Optional[float]]:
    """Rates over a window between two metrics() snapshots: hit rate and recomputed fraction (reused
    tokens computed, summed over layers, over reused tokens times layers) of the requests in between (the gauges themselves are cumulative), store size at the end, compression's kept token-layers.
    None where the window saw no images (or the server is stock)."""
    def d(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    lookups = d("key_hits") + d("key_misses") + d("key_mismatches")
    return {
        "key_hits": d("key_hits"),
        "key_lookups": lookups,
        "hit_rate": d("key_hits") / lookups if lookups else None,
        "reused_tokens": d("reused_tokens"),
        "recomputed_tokens": d("recomputed_tokens"),
        # Per layer, a check layer's QKV of every scored token included (VLCache's r averaged over layers).
        "recomputed_fraction": (d("recomputed_token_layers") / d("reused_token_layers")
                                if d("reused_token_layers") else None),
        "store_tokens": after.get("store_tokens"),
        "store_bytes": after.get("store_bytes"),
        # Compression: the trimmed requests' kept and total prompt token-layers in the window.
        "compress_kept_token_layers": d("compress_kept_token_layers"),
        "compress_prompt_token_layers": d("compress_prompt_token_layers"),
    }
