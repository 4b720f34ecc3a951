"""Soak: a stock server and a vlcache `full` server side by side on the trained tiny Qwen2.5-VL, a mixed
concurrent stream, every successful vlcache answer compared with stock's (what benchmarks/soak.sh runs).

    python -m benchmarks.soak --model /tmp/tiny-qwen2.5-vl --data-dir /tmp/soak_eval --out-dir $OUT/soak \\
        --log-dir /tmp/soak_logs [--deadline-unix T] [--store-images 6] [--chunked-prefill-size 256]
    python -m benchmarks.soak --stock-url URL --vlcache-url URL --vlcache-log FILE ...   (servers already up)

Both servers get the same SGLang flags (prefill in --chunked-prefill-size chunks, so an image's reuse is
split across chunks and aborts land mid-prefill); the vlcache one adds --enable-vlcache --vlcache-policy
full and a store of --store-images images. The stream, in rounds until --rounds or the deadline (every round starts with an idle `/flush_cache`, so
rounds are independent and the first one is always whole): every record of the eval sets (A, B, multi:
each image asked several times after different text) under a cache salt drawn per request (none,
tenant-a, tenant-b), some with `n` 2; a few valid odd images (28 x 5000, 56 x 56, an 8000 x 8000 PNG
under PIL's bomb limit); the hostile catalogue (`hostile_catalogue`: corrupt, truncated, empty images,
junk and non-ASCII base64 before and after the same image was served, a 20000 x 20000 decompression
bomb, 28 x 8000, unreachable URLs, /proc/kmsg and a file over the size cap as `file://` and absolute
paths, a bad `custom_params.vlcache`); clients that close the socket mid-request (streaming and not, at
several delays, and one that never finishes its body); `/flush_cache` under load. Before the stream a
salt probe checks tenant isolation with `cached_tokens` (an image seen under another salt reuses
nothing). /health of both servers is polled all along. After it the servers sit idle (SGLang's strict
idle check runs; SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE=1 makes a leak raise) and their logs are
searched for its leak reports.

Checks: stock and vlcache give the same text for every request both served (greedy, every choice of n);
hostile requests get their 4xx with a message that says what is wrong, the same status cached or not;
no unexpected status; /health never fails; no leak report; both servers alive at the end. Writes
DIR/soak.{json,md}; the short table is printed last.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import os
import random
import re
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import accuracy  # noqa: E402  (one record format, one message builder)
import images  # noqa: E402
import launch  # noqa: E402

SALTS = (None, "tenant-a", "tenant-b")
CHAT = "/v1/chat/completions"
# Gauges the table reports (vlcache_sglang/stats.py), cumulative over the server's life.
GAUGES = ("key_hits", "key_misses", "key_mismatches", "stored_images", "evicted_images", "store_skipped",
          "second_generation_skipped", "store_tokens")
# A 400 must say what is wrong with the request, not only that something failed.
LARGE_FILE_BYTES = 200 << 20  # over local_images.MAX_LOCAL_IMAGE_BYTES (128 MiB); sparse, costs no disk


# ----- the hostile catalogue --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Hostile:
    """One bad request: its image (or override), the statuses that are right for it, and a pattern the
    error message must match (case-insensitive) to count as clear."""

    name: str
    image: Optional[str]  # the image_url sent in place of the record's image (None: the record's own)
    expect: tuple[int, ...]
    message: str
    override: Optional[dict] = None  # custom_params.vlcache
    extra_images: int = 0  # valid images of the record kept before the bad one (a bad image among good)
    local: bool = False  # names a file on the server's machine


def _noise(n: int, seed: int) -> bytes:
    """Fixed junk bytes. Not os.urandom: about 3 draws in 1000 after a PNG signature read as a
    truncated PNG, not an unidentifiable one ("Truncated File Read"), and that message fails the
    pattern (a flaky CI run, 2026-12-01). These seeds give PIL's "cannot identify image file"."""
    return random.Random(seed).randbytes(n)


def hostile_catalogue(twin_url: str, big_file: str) -> list[Hostile]:
    """twin_url: a valid PNG data URL of the stream (junk/non-ASCII variants of it are sent before and
    after it was served); big_file: a path over the server's local-file size cap."""
    head, payload = twin_url.split(",", 1)
    good = images.image_bytes(96, 64, seed=7)
    jpeg = images.image_bytes(96, 64, seed=8, fmt="JPEG")
    # SGLang's loader error (the image's index, the URL cut at 100 characters) after our prefix, ending in
    # PIL's or requests' reason: what the client needs to fix.
    unknown = r"could not be decoded.*index 0.*cannot identify image file"
    local = r"local image"
    return [
        Hostile("corrupt_png", images.bytes_data_url(b"\x89PNG\r\n\x1a\n" + _noise(200, seed=1)), (400,), unknown),
        Hostile("truncated_png", images.bytes_data_url(good[: len(good) // 2]), (400,), r"decoded.*truncated"),
        Hostile("truncated_jpeg", images.bytes_data_url(jpeg[: len(jpeg) // 2], "image/jpeg"), (400,),
                r"decoded.*truncated"),
        # Starts with SOI and ends with EOI: SGLang tries nvJPEG on the GPU first, then PIL.
        Hostile("corrupt_jpeg_soi_eoi", images.bytes_data_url(b"\xff\xd8" + _noise(300, seed=2) + b"\xff\xd9",
                                                              "image/jpeg"), (400,), unknown),
        Hostile("empty_payload", "data:image/png;base64,", (400,), unknown),
        Hostile("text_as_image", images.bytes_data_url(b"just some text, not an image", "image/png"), (400,), unknown),
        Hostile("empty_url", "", (400,), unknown),
        Hostile("data_url_without_comma", "data:image/png;base64", (400,), r"malformed data URL"),
        # A relative name: SGLang decodes it as base64 (it reads only absolute paths and file:// URLs).
        Hostile("relative_path", "image.png", (400,), r"base64"),
        Hostile("junk_base64", f"{head},{payload[:40]}!{payload[40:]}", (400,), r"base64"),
        Hostile("non_ascii_base64", f"{head},{payload[:40]}é{payload[40:]}", (400,), r"base64"),
        Hostile("bomb_20000x20000", images.bytes_data_url(images.bomb_png(20000, 20000)), (400,),
                r"decoded.*decompression bomb"),
        Hostile("aspect_28x8000", images.bytes_data_url(images.image_bytes(28, 8000, seed=9)), (400,),
                r"aspect ratio"),
        Hostile("bad_second_image", images.bytes_data_url(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64), (400,),
                r"decoded.*index 1.*cannot identify image file",
                extra_images=1),
        Hostile("url_refused", "http://127.0.0.1:9/image.png", (400,), r"decoded.*Connection refused"),
        Hostile("url_unresolvable", "http://vlcache-soak.invalid/image.png", (400,),
                r"decoded.*(resolve|Name or service)"),
        Hostile("proc_kmsg_abs", "/proc/kmsg", (400,), local, local=True),
        Hostile("proc_kmsg_file_url", "file:///proc/kmsg", (400,), local, local=True),
        Hostile("large_file_abs", big_file, (400,), local, local=True),
        Hostile("large_file_file_url", "file://" + big_file, (400,), local, local=True),
        Hostile("missing_file", "/nonexistent/vlcache-soak.png", (400,), local, local=True),
        Hostile("bad_override_policy", None, (400,), r"unknown; choose one of", override={"policy": "magic"}),
        Hostile("bad_override_ratio", None, (400,), r"\[0, 1\]", override={"recompute_ratio": 7}),
    ]


# Sent twice per round: before the twin image was served in that round, and after.
TWIN_KINDS = ("junk_base64", "non_ascii_base64")


def make_large_file(path: Path, size: int = LARGE_FILE_BYTES) -> str:
    """A sparse file of `size` bytes with a PNG signature (what a careless client's path might name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.truncate(size)
    return str(path)


# ----- the plan ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Step:
    """One thing the stream does. kind: ok (compared with stock), hostile, abort, flush_idle (after
    every earlier step has finished), flush_load (while others run), probe (the salt probe)."""

    id: str
    kind: str
    round: int = 0
    body: Optional[dict] = None  # the vlcache server's chat body (stock gets it without custom_params)
    expect: tuple[int, ...] = (200,)
    message: Optional[str] = None  # hostile: the pattern of a clear message
    name: Optional[str] = None  # hostile: catalogue name (+ ":before" / ":after" for the twins)
    after: Optional[str] = None  # start only once this step has finished
    abort: Optional[dict] = None  # {"after_s", "stream", "half_body"}
    compare: bool = False
    barrier: bool = False  # runs alone, after every earlier step has finished (flush_idle, the twins' before)


# Compared requests ask for the top 2 logprobs of each token: a mismatch then shows its margin (a near
# tie that batching moved reads differently from a reuse that changed the answer).
TOP_LOGPROBS = 2
# A near tie: both servers' best two logprobs within one bf16 step of a logit of magnitude 8-16 (2^-4 =
# 0.0625, the tiny model's logits are bf16). Seen on the H200 (2026-12-01): stock's gap 0.0625, vlcache
# `full` (a stored image recomputed by the selective kernels) an exact tie, the other colour first.
TIE_NATS = 0.07


def chat_body(rec: accuracy.Record, max_tokens: int, salt: Optional[str] = None, n: int = 1,
              override: Optional[dict] = None, top_logprobs: int = 0) -> dict:
    body = accuracy.chat_body(rec, max_tokens, override, top_logprobs)
    if salt is not None:
        body["cache_salt"] = salt  # SGLang 0.5.16's ChatCompletionRequest field; Req.extra_key starts with it
    if n > 1:
        body["n"] = n
    return body


def stock_steps(steps: list[Step]) -> list[Step]:
    """What the stock server gets: the compared requests and the idle flushes (rounds start cold)."""
    return [s for s in steps if s.compare or s.kind == "flush_idle"]


def stock_body(body: dict) -> dict:
    return {k: v for k, v in body.items() if k != "custom_params"}


def odd_valid_images() -> list[tuple[str, str]]:
    """Valid images of odd shapes (compared with stock like any other request)."""
    return [("tall_28x5000", images.bytes_data_url(images.image_bytes(28, 5000, seed=11))),
            ("small_56x56", images.bytes_data_url(images.image_bytes(56, 56, seed=12))),
            ("large_8000x8000", images.bytes_data_url(images.bomb_png(8000, 8000)))]


def plan_round(r: int, records: list[accuracy.Record], catalogue: list[Hostile], odd: list[tuple[str, str]],
               max_tokens: int, seed: int, n2_share: float = 0.1, aborts: int = 6) -> list[Step]:
    """One round: an idle flush, the twins' 'before' requests, every record under a drawn salt (n 2
    for n2_share of them) with the hostile catalogue, the odd images, the aborts and two flushes under
    load spread evenly among them, then the twins' 'after' requests once their image was served."""
    rng = random.Random(seed * 1000 + r)
    twin_rec = next(rec for rec in records if len(rec.images) == 1)
    twin_salt = rng.choice(SALTS)
    steps = [Step(f"r{r}-flush-idle", "flush_idle", r, expect=(200,), barrier=True)]
    by_name = {h.name: h for h in catalogue}
    for name in TWIN_KINDS:
        steps.append(_hostile_step(f"r{r}-{name}-before", by_name[name], twin_rec, r, max_tokens, twin_salt,
                                   name + ":before"))
        steps[-1].barrier = True  # answered before the twin image is sent
    main: list[Step] = []
    twin_ok = f"r{r}-twin"
    main.append(Step(twin_ok, "ok", r, chat_body(twin_rec, max_tokens, twin_salt, top_logprobs=TOP_LOGPROBS),
                     compare=True))
    for i, rec in enumerate(records):
        # SGLang 0.5.16 itself refuses n > 1 with several images ("The length of image_data should be
        # equal to the batch size", 400 from stock alike: H200 soak, 2026-12-01), so n 2 goes to
        # single-image requests only.
        n = 2 if rng.random() < n2_share and len(rec.images) == 1 else 1
        main.append(Step(f"r{r}-{rec.id}" + ("-n2" if n > 1 else ""), "ok", r,
                         chat_body(rec, max_tokens, rng.choice(SALTS), n, top_logprobs=TOP_LOGPROBS), compare=True))
    extras: list[Step] = []
    for h in catalogue:
        if h.name not in TWIN_KINDS:
            rec = rng.choice([x for x in records if len(x.images) > h.extra_images])
            extras.append(_hostile_step(f"r{r}-{h.name}", h, rec, r, max_tokens, rng.choice(SALTS), h.name))
    for name, url in odd:
        rec = rng.choice([x for x in records if len(x.images) == 1])
        odd_rec = dataclasses.replace(rec, images=[url])
        extras.append(Step(f"r{r}-{name}", "ok", r, chat_body(odd_rec, max_tokens, rng.choice(SALTS),
                                                              top_logprobs=TOP_LOGPROBS), compare=True))
    variants = [{"after_s": 0.0, "stream": True}, {"after_s": 0.05, "stream": True},
                {"after_s": 0.3, "stream": True}, {"after_s": 0.05, "stream": False},
                {"after_s": 1.0, "stream": False}, {"after_s": 0.0, "stream": False, "half_body": True}]
    for k in range(aborts):
        rec = rng.choice(records)
        body = chat_body(rec, 256, rng.choice(SALTS))
        body["ignore_eos"] = True  # a long generation, so the close lands while it runs
        v = dict(variants[k % len(variants)])
        if v["stream"]:
            body["stream"] = True
        extras.append(Step(f"r{r}-abort{k}", "abort", r, body, expect=(), abort=v))
    extras += [Step(f"r{r}-flush-load{k}", "flush_load", r, expect=(200, 400)) for k in range(2)]
    rng.shuffle(extras)
    # Spread the extras evenly through the records (the load they land in is the records').
    gap = max(1, len(main) // (len(extras) + 1))
    merged: list[Step] = []
    for i, step in enumerate(main):
        merged.append(step)
        if i % gap == gap - 1 and extras:
            merged.append(extras.pop())
    merged += extras
    steps += merged
    for name in TWIN_KINDS:
        s = _hostile_step(f"r{r}-{name}-after", by_name[name], twin_rec, r, max_tokens, twin_salt, name + ":after")
        s.after = twin_ok
        steps.append(s)
    return steps


def _hostile_step(id_: str, h: Hostile, rec: accuracy.Record, r: int, max_tokens: int, salt: Optional[str],
                  name: str) -> Step:
    if h.image is not None:
        rec = dataclasses.replace(rec, images=rec.images[: h.extra_images] + [h.image]
                                  + rec.images[h.extra_images + 1:])
    return Step(id_, "hostile", r, chat_body(rec, max_tokens, salt, override=h.override), expect=h.expect,
                message=h.message, name=name)


def plan_probe(records: list[accuracy.Record], max_tokens: int) -> list[Step]:
    """Tenant isolation, before the stream (sequential, idle server): one image after three different
    texts, under salt a (default policy), salt b then salt a again, both with the override `none` so a
    reused image shows in cached_tokens. Under b nothing may be reused (cached_tokens 0); under a again
    the image should be (cached_tokens >= its tokens)."""
    by_image: dict[str, list[accuracy.Record]] = collections.defaultdict(list)
    for rec in records:
        if len(rec.images) == 1:
            by_image[rec.images[0]].append(rec)
    group = next((g for g in by_image.values() if len(g) >= 3), None)
    if group is None:
        return []
    none = {"policy": "none"}
    return [Step("probe-a", "probe", body=chat_body(group[0], max_tokens, "probe-a")),
            Step("probe-b-other-salt", "probe", body=chat_body(group[1], max_tokens, "probe-b", override=none)),
            Step("probe-a-same-salt", "probe", body=chat_body(group[2], max_tokens, "probe-a", override=none))]


# ----- running a stream against one server ------------------------------------------------------

def parse_chat(status: int, text: str) -> dict:
    """What a chat response says: every choice's text (by index), cached_tokens, or the error message."""
    out: dict[str, Any] = {"status": status}
    try:
        data = json.loads(text) if text else None
    except json.JSONDecodeError:
        data = None
    if status == 200 and isinstance(data, dict) and "choices" in data:
        choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
        out["texts"] = [(c.get("message") or {}).get("content") for c in choices]
        tops = [_token_tops(c) for c in choices]
        if any(tops):
            out["tops"] = tops
        details = (data.get("usage") or {}).get("prompt_tokens_details") or {}
        out["cached_tokens"] = details.get("cached_tokens")
    else:
        msg = data.get("message") if isinstance(data, dict) else None
        if msg is None and isinstance(data, dict) and isinstance(data.get("error"), dict):
            msg = data["error"].get("message")
        out["message"] = str(msg if msg is not None else text)[:500]
    return out


def _token_tops(choice: dict) -> Optional[list]:
    """[[token, logprob of the best, of the second best], ...] per generated token, or None."""
    try:
        content = choice["logprobs"]["content"]
        rows = []
        for t in content:
            top = sorted((float(x["logprob"]) for x in t.get("top_logprobs") or []), reverse=True)
            rows.append([t["token"], top[0] if top else float(t["logprob"]), top[1] if len(top) > 1 else None])
        return rows
    except (KeyError, TypeError, ValueError):
        return None


def first_difference_gaps(a: Optional[list], b: Optional[list]) -> Optional[tuple[Optional[float], Optional[float]]]:
    """At the first token where two answers' token lists differ, each server's gap between its best and
    second-best logprob (None where a server sent no second): near 0 means a near tie. None when the
    lists agree or a server sent no logprobs."""
    if not a or not b:
        return None
    for x, y in zip(a, b):
        if x[0] != y[0]:
            return tuple(None if r[2] is None else r[1] - r[2] for r in (x, y))  # type: ignore[return-value]
    return None


def smaller_gap(gaps: tuple[Optional[float], Optional[float]]) -> Optional[float]:
    """The smaller known gap of a `first_difference_gaps` pair (None when neither server sent one)."""
    return min((g for g in gaps if g is not None), default=None)


def is_near_tie(gaps: Optional[tuple[Optional[float], Optional[float]]], tol: float = TIE_NATS) -> bool:
    """Both servers' top two candidates within `tol` of each other where the answers part: a bf16 rounding
    difference (another kernel, another batch) can order them either way. Anything else is a wrong answer."""
    return gaps is not None and all(g is not None and g <= tol for g in gaps)


class Stream:
    """Runs steps against one server with `concurrency` in flight, in order: a flush_idle waits for every
    earlier step, a step with `after` waits for that one. Past the deadline, or after `max_dead`
    requests in a row got no answer at all (status 0: the server is gone), the rest are not sent."""

    def __init__(self, label: str, url: str, concurrency: int, timeout_s: float, deadline: Optional[float],
                 stock: bool = False, max_dead: int = 3, progress: Callable[[str], None] = print):
        self.label, self.url, self.concurrency, self.timeout_s = label, url.rstrip("/"), concurrency, timeout_s
        self.deadline, self.stock, self.max_dead, self.progress = deadline, stock, max_dead, progress
        self.results: dict[str, dict] = {}
        self.done: dict[str, threading.Event] = {}
        self.lock = threading.Lock()
        self.dead_in_row = 0
        self.gone: Optional[str] = None

    def _cut(self) -> Optional[str]:
        if self.gone:
            return self.gone
        if self.deadline is not None and time.time() > self.deadline:
            return "deadline"
        return None

    def _run(self, step: Step) -> dict:
        if step.after and step.after in self.done:
            self.done[step.after].wait(timeout=max(1.0, (self.deadline or time.time() + 600) - time.time()))
        why = self._cut()
        if why:
            return {"status": None, "outcome": "not sent", "why": why}
        t0 = time.perf_counter()
        if step.kind in ("flush_idle", "flush_load"):
            # Idle: SGLang waits up to ?timeout= s for the running requests (aborted ones included) to end.
            query = "?timeout=20" if step.kind == "flush_idle" else ""
            status, text = launch.http_post(self.url + "/flush_cache" + query, timeout_s=self.timeout_s)
            res = {"status": status, "message": text[:200]}
        elif step.kind == "abort":
            try:
                res = launch.post_and_disconnect(self.url + CHAT, step.body, **step.abort)
            except OSError as e:  # nothing answers: the server is gone, not a client that went away
                res = {"status": 0, "complete": False, "message": f"{type(e).__name__}: {e}"}
        else:
            body = stock_body(step.body) if self.stock else step.body
            res = parse_chat(*launch.http_post(self.url + CHAT, body, timeout_s=self.timeout_s))
        res["latency_s"] = round(time.perf_counter() - t0, 4)
        with self.lock:
            if res.get("status") == 0:
                self.dead_in_row += 1
                if self.dead_in_row >= self.max_dead and not self.gone:
                    self.gone = f"{self.max_dead} requests in a row got no answer"
                    self.progress(f"{self.label}: {self.gone}; the rest of the stream is not sent")
            elif step.kind != "abort":
                self.dead_in_row = 0
        return res

    def run(self, steps: list[Step]) -> dict[str, dict]:
        t0, last = time.monotonic(), time.monotonic()
        pending = []
        for s in steps:
            self.done[s.id] = threading.Event()

        def one(step: Step) -> None:
            try:
                res = self._run(step)
            except Exception as e:  # noqa: BLE001 - a driver bug must show in the table, not end the run
                res = {"status": None, "outcome": "driver error", "why": f"{type(e).__name__}: {e}"}
            self.results[step.id] = res
            self.done[step.id].set()

        with ThreadPoolExecutor(self.concurrency) as pool:
            for step in steps:
                if step.barrier:
                    for f in pending:
                        f.result()
                    pending = []
                    if step.kind == "flush_idle" and not self._cut():
                        time.sleep(0.5)  # let the scheduler go idle (SGLang's idle check) before the flush
                    one(step)
                    continue
                pending.append(pool.submit(one, step))
                if time.monotonic() - last > 10:
                    last = time.monotonic()
                    self.progress(f"{self.label}: {len(self.results)}/{len(steps)} steps done, "
                                  f"{time.monotonic() - t0:.0f} s")
            for f in pending:
                f.result()
        return self.results


class HealthPoller:
    """GET /health of each server every `every_s` in a thread; every answer recorded."""

    def __init__(self, urls: dict[str, str], every_s: float = 1.0, timeout_s: float = 20.0):
        self.urls, self.every_s, self.timeout_s = urls, every_s, timeout_s
        self.polls: dict[str, list[tuple[float, int, float]]] = {k: [] for k in urls}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(k,), daemon=True) for k in urls]

    def _loop(self, label: str) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            status = launch.http_get(self.urls[label] + "/health", timeout_s=self.timeout_s)[0]
            self.polls[label].append((time.time(), status, round(time.perf_counter() - t0, 3)))
            self._stop.wait(self.every_s)

    def __enter__(self) -> "HealthPoller":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout_s + 1)

    def summary(self, label: str) -> dict:
        polls = self.polls[label]
        fails = [p for p in polls if p[1] != 200]
        return {"polls": len(polls), "failures": len(fails), "max_latency_s": max((p[2] for p in polls), default=None),
                "failure_statuses": dict(collections.Counter(p[1] for p in fails))}


# ----- verdicts ---------------------------------------------------------------------------------

def outcome(step: Step, res: dict) -> str:
    """served / expected error / unexpected / aborted / completed (an abort the server beat) / not sent."""
    if res.get("outcome") in ("not sent", "driver error"):
        return res["outcome"]
    if step.kind == "abort":
        if res.get("status") == 0:
            return "unexpected"
        return "completed" if res.get("complete") else "aborted"
    status = res.get("status")
    if status == 200 and 200 in step.expect:
        return "served"
    if status in step.expect:
        return "expected error"
    return "unexpected"


def clear_message(step: Step, res: dict) -> Optional[bool]:
    if step.kind != "hostile" or res.get("status") not in step.expect or not step.message:
        return None
    return re.search(step.message, res.get("message") or "", re.IGNORECASE) is not None


def compare(steps: list[Step], stock: dict[str, dict], vl: dict[str, dict]) -> dict:
    """Requests both servers served: same texts (every choice), else listed, as a near tie (`is_near_tie`
    at every choice that differs) or a wrong answer."""
    wrong, ties, compared = [], [], 0
    for s in steps:
        if not s.compare:
            continue
        a, b = stock.get(s.id) or {}, vl.get(s.id) or {}
        if a.get("status") != 200 or b.get("status") != 200:
            continue
        compared += 1
        if a.get("texts") != b.get("texts"):
            entry = mismatch(s.id, (s.body or {}).get("cache_salt"), (s.body or {}).get("n", 1), a, b)
            (ties if entry["near_tie"] else wrong).append(entry)
    return {"compared": compared, "wrong": wrong, "near_ties": ties}


def mismatch(id_: str, salt: Optional[str], n: int, a: dict, b: dict) -> dict:
    """One request whose texts differ: the gaps where each differing choice parts, and whether all are ties."""
    gaps = [first_difference_gaps(x, y) for x, y, tx, ty in
            zip(a.get("tops") or [], b.get("tops") or [], a["texts"], b["texts"]) if tx != ty]
    known = [g for g in gaps if g is not None]
    margins = [m for m in map(smaller_gap, known) if m is not None]
    return {"id": id_, "stock": a.get("texts"), "vlcache": b.get("texts"), "salt": salt, "n": n,
            "gaps": known, "margin": min(margins, default=None),
            "near_tie": bool(gaps) and len(known) == len(gaps) and all(is_near_tie(g) for g in known)}


def same_error(a: Optional[dict], b: Optional[dict]) -> bool:
    """Both servers refused the request alike (status and message): SGLang's own behaviour, not ours."""
    return bool(a and b) and a.get("status") not in (None, 0, 200) and a.get("status") == b.get("status") \
        and a.get("message") == b.get("message")


def tally(steps: list[Step], results: dict[str, dict], other: Optional[dict[str, dict]] = None) -> dict:
    """Per server: steps sent, chat requests served, errors by status (expected / unexpected / the same
    refusal as the `other` server's), flushes by status, aborts, not sent."""
    other = other or {}
    out: dict[str, Any] = {"sent": 0, "served": 0, "aborted": 0, "completed_before_close": 0, "not_sent": 0,
                           "flushes": collections.Counter(),
                           "driver_errors": 0, "expected": collections.Counter(), "unexpected": collections.Counter(),
                           "unexpected_ids": [], "as_other": collections.Counter(), "as_other_ids": [],
                           "unclear_messages": []}
    for s in steps:
        res = results.get(s.id)
        if res is None:
            continue
        v = outcome(s, res)
        if v == "not sent":
            out["not_sent"] += 1
            continue
        if v == "driver error":
            out["driver_errors"] += 1
            out["unexpected_ids"].append((s.id, res.get("why")))
            continue
        out["sent"] += 1
        if s.kind.startswith("flush") and v != "unexpected":
            out["flushes"][f"{s.kind} {res['status']}"] += 1
        elif v == "served":
            out["served"] += 1
        elif v == "expected error":
            out["expected"][res["status"]] += 1
        elif v == "unexpected" and same_error(res, other.get(s.id)):
            out["as_other"][res["status"]] += 1
            out["as_other_ids"].append((s.id, f"{res['status']} {elide(res.get('message', ''))}"))
        elif v == "unexpected":
            out["unexpected"][res.get("status")] += 1
            out["unexpected_ids"].append((s.id, f"{res.get('status')} {elide(res.get('message', ''))}"))
        elif v == "aborted":
            out["aborted"] += 1
        elif v == "completed":
            out["completed_before_close"] += 1
        if clear_message(s, res) is False:
            out["unclear_messages"].append((s.id, elide(res.get("message", ""))))
    out["expected"] = dict(out["expected"])
    out["flushes"] = dict(out["flushes"])
    out["unexpected"] = {str(k): v for k, v in out["unexpected"].items()}
    out["as_other"] = {str(k): v for k, v in out["as_other"].items()}
    return out


def twins(steps: list[Step], results: dict[str, dict]) -> list[dict]:
    """Each twin kind's status before and after its image was served, per round (must be the same)."""
    rows = []
    for s in steps:
        if s.name and s.name.endswith(":before"):
            kind = s.name.split(":")[0]
            after = next((x for x in steps if x.round == s.round and x.name == kind + ":after"), None)
            a, b = results.get(s.id, {}), results.get(after.id, {}) if after else {}
            if a.get("status") is not None and b.get("status") is not None:
                rows.append({"round": s.round, "kind": kind, "before": a["status"], "after": b["status"],
                             "same": a["status"] == b["status"]})
    return rows


def probe_verdict(results: dict[str, dict], image_tokens: int) -> dict:
    """The salt probe: another salt must reuse nothing; the same salt should reuse the image."""
    other = results.get("probe-b-other-salt", {})
    same = results.get("probe-a-same-salt", {})
    if other.get("status") != 200 or same.get("status") != 200:
        return {"ran": False, "why": f"statuses {other.get('status')} / {same.get('status')}"}
    return {"ran": True, "other_salt_cached": other.get("cached_tokens"), "same_salt_cached": same.get("cached_tokens"),
            "isolated": other.get("cached_tokens") == 0,
            "same_salt_reused": (same.get("cached_tokens") or 0) >= image_tokens}


def hostile_rows(steps: list[Step], results: dict[str, dict]) -> list[dict]:
    """Per hostile kind: the statuses it got (all rounds), whether each was expected, one message."""
    rows: dict[str, dict] = {}
    for s in steps:
        res = results.get(s.id)
        if s.kind != "hostile" or res is None or res.get("status") is None:
            continue
        row = rows.setdefault(s.name, {"kind": s.name, "expect": list(s.expect), "statuses": collections.Counter(),
                                       "clear": True, "message": None, "latency_max_s": 0.0})
        row["statuses"][res["status"]] += 1
        row["clear"] &= clear_message(s, res) is not False and res["status"] in s.expect
        row["message"] = row["message"] or res.get("message")
        row["latency_max_s"] = max(row["latency_max_s"], res.get("latency_s", 0.0))
    return [{**r, "statuses": dict(r["statuses"])} for _, r in sorted(rows.items())]


# ----- report -----------------------------------------------------------------------------------

def elide(text: str, n: int = 160) -> str:
    """The head and the tail of a long message (SGLang's loader errors put the reason last)."""
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n // 3] + " … " + text[-(n - n // 3 - 3):]


def _counts(d: dict) -> str:
    return ", ".join(f"{k}×{v}" for k, v in sorted(d.items(), key=lambda kv: str(kv[0]))) or "0"


def short_table(report: dict) -> str:
    st, vl = report["tally"]["stock"], report["tally"]["vlcache"]
    hs, hv = report["health"]["stock"], report["health"]["vlcache"]
    g = report.get("gauges") or {}
    probe = report["probe"]
    twin_bad = sum(not t["same"] for t in report["twins"])
    rows = [
        ("steps sent: requests, flushes, aborts (not sent: deadline)", f"{st['sent']} ({st['not_sent']})", f"{vl['sent']} ({vl['not_sent']})"),
        ("chat requests served (200)", st["served"], vl["served"]),
        ("errors, expected (status×n)", _counts(st["expected"]), _counts(vl["expected"])),
        ("errors, UNEXPECTED (status×n; 0 = no answer)", _counts(st["unexpected"]), _counts(vl["unexpected"])),
        ("errors both servers give alike: SGLang's own (status×n)", _counts(st.get("as_other", {})),
         _counts(vl.get("as_other", {}))),
        ("/flush_cache (idle / under load: status×n)", _counts(st["flushes"]), _counts(vl["flushes"])),
        ("client aborts (closed mid-request / server done first)",
         f"{st['aborted']} / {st['completed_before_close']}", f"{vl['aborted']} / {vl['completed_before_close']}"),
        (f"answers compared with stock / WRONG / near ties (both gaps ≤ {TIE_NATS})", "–",
         f"{report['compare']['compared']} / **{len(report['compare']['wrong'])}** / "
         f"{len(report['compare'].get('near_ties', []))}"),
        ("hostile: unclear messages", "–", len(vl["unclear_messages"])),
        ("junk/non-ASCII base64: status differs cached vs not", "–", f"{twin_bad} of {len(report['twins'])}"),
        ("salt probe: other salt cached_tokens (must be 0) / same salt",
         "–", f"{probe.get('other_salt_cached')} / {probe.get('same_salt_cached')}" if probe.get("ran")
         else f"not run ({probe.get('why')})"),
        ("leak reports in the server log (strict idle check)", report["leaks"]["stock"]["count"],
         f"**{report['leaks']['vlcache']['count']}**"),
        ("/health failures / polls (max latency s)", f"{hs['failures']} / {hs['polls']} ({hs['max_latency_s']})",
         f"**{hv['failures']}** / {hv['polls']} ({hv['max_latency_s']})"),
        ("alive at the end", report["alive"]["stock"], report["alive"]["vlcache"]),
        ("vlcache gauges: hits / misses / mismatches", "–",
         " / ".join(_g(g, k) for k in ("key_hits", "key_misses", "key_mismatches"))),
        ("vlcache gauges: stored / evicted / store_skipped / second_generation_skipped", "–",
         " / ".join(_g(g, k) for k in ("stored_images", "evicted_images", "store_skipped",
                                       "second_generation_skipped"))),
    ]
    lines = ["| | stock | vlcache full |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines.append("")
    lines.append(f"**{'PASS' if report['passed'] else 'FAIL'}**" + ("" if report["passed"] else
                                                                    ": " + "; ".join(report["failures"])))
    return "\n".join(lines)


def _g(g: dict, k: str) -> str:
    return "–" if k not in g else f"{g[k]:.0f}"


def hostile_md(rows: list[dict]) -> str:
    lines = ["| hostile input | expected | got (status×n) | clear message | slowest s | message |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        msg = elide(r["message"] or "", 150).replace("|", "\\|")
        lines.append(f"| {r['kind']} | {r['expect']} | {_counts(r['statuses'])} | {'yes' if r['clear'] else 'NO'} "
                     f"| {r['latency_max_s']:.2f} | {msg} |")
    return "\n".join(lines)


def verdict(report: dict) -> tuple[bool, list[str]]:
    """The checks that must hold; each failure named."""
    fails = []
    vl, st = report["tally"]["vlcache"], report["tally"]["stock"]
    if report["compare"]["wrong"]:
        fails.append(f"{len(report['compare']['wrong'])} wrong answers")
    for label, t in (("vlcache", vl), ("stock", st)):
        if t["unexpected"] or t["driver_errors"]:
            fails.append(f"{label}: unexpected statuses {_counts(t['unexpected'])}"
                         + (f", {t['driver_errors']} driver errors" if t["driver_errors"] else ""))
        if report["leaks"][label]["count"]:
            fails.append(f"{label}: {report['leaks'][label]['count']} leak reports")
        if report["health"][label]["failures"]:
            fails.append(f"{label}: {report['health'][label]['failures']} /health failures")
        if report["alive"][label] is False:
            fails.append(f"{label}: not alive at the end")
    if vl["unclear_messages"]:
        fails.append(f"{len(vl['unclear_messages'])} hostile requests with an unclear message")
    if any(not t["same"] for t in report["twins"]):
        fails.append("base64 verdict differs cached vs not")
    if report["probe"].get("ran") and not report["probe"]["isolated"]:
        fails.append("an image was reused across salts")
    if report["compare"]["compared"] == 0:
        fails.append("no answer compared")
    return not fails, fails


def build_report(steps: list[Step], probe_steps: list[Step], stock: dict, vl: dict, health: HealthPoller,
                 leaks: dict, alive: dict, gauges: dict, image_tokens: int, meta: dict) -> dict:
    report = {"meta": meta, "tally": {"stock": tally(steps, stock, vl), "vlcache": tally(steps + probe_steps, vl, stock)},
              "compare": compare(steps, stock, vl), "twins": twins(steps, vl), "hostile": hostile_rows(steps, vl),
              "probe": probe_verdict(vl, image_tokens),
              "health": {k: health.summary(k) for k in ("stock", "vlcache")}, "leaks": leaks, "alive": alive,
              "gauges": gauges,
              "rounds_complete": {k: rounds_complete(steps, r) for k, r in (("stock", stock), ("vlcache", vl))}}
    report["passed"], report["failures"] = verdict(report)
    return report


def rounds_complete(steps: list[Step], results: dict) -> int:
    """Rounds whose every step given to this server was sent (steps it was not given have no result)."""
    rounds: dict[int, bool] = {}
    for s in steps:
        res = results.get(s.id)
        if res is not None:
            rounds[s.round] = rounds.get(s.round, True) and res.get("outcome") != "not sent"
    return sum(rounds.values())


def _mismatch_lines(entries: list[dict]) -> str:
    def gaps(w: dict) -> str:
        return "; ".join("(" + ", ".join("–" if x is None else f"{x:.4f}" for x in g) + ")" for g in w.get("gaps", []))
    return "\n".join(f"- {w['id']} (salt {w['salt']}, n {w['n']}, gaps {gaps(w) or '–'}): stock {w['stock']!r}, "
                     f"vlcache {w['vlcache']!r}" for w in entries[:30]) or "none"


def report_md(report: dict) -> str:
    table = short_table(report)
    m = report["meta"]
    return "\n".join([
        f"# Soak, {m['date']}", "",
        f"Model {m['model']}; stock vs vlcache `{m['vlcache_flags']}`, both `--chunked-prefill-size "
        f"{m['chunked_prefill_size']}` (0: SGLang's default); {m['rounds_planned']} rounds planned "
        f"({report['rounds_complete']['vlcache']} complete on vlcache), {m['concurrency']} in flight per server, "
        f"stream {m['stream_s']:.0f} s.", "",
        "## Hostile inputs (vlcache server)", "", hostile_md(report["hostile"]), "",
        "## Wrong answers", "",
        "gaps: at the first token where the answers differ, each server's (stock, vlcache) gap between its "
        f"best and second-best logprob. Both ≤ {TIE_NATS} (one bf16 step of a logit of magnitude 8-16) is a "
        "near tie, listed apart: rounding in another kernel or batch orders the two either way. Anything "
        "else is a wrong answer.", "",
        _mismatch_lines(report["compare"]["wrong"]), "",
        "## Near ties", "", _mismatch_lines(report["compare"].get("near_ties", [])), "",
        "## Unexpected statuses", "",
        "\n".join(f"- {label} {i}: {why}" for label in ("stock", "vlcache")
                  for i, why in report["tally"][label]["unexpected_ids"][:30]) or "none", "",
        "## Refused alike by both servers (SGLang's own behaviour, not counted as unexpected)", "",
        "\n".join(f"- {label} {i}: {why}" for label in ("stock", "vlcache")
                  for i, why in report["tally"][label].get("as_other_ids", [])[:10]) or "none", "",
        "## Leak reports", "",
        "\n".join(f"- {label}: {line}" for label in ("stock", "vlcache")
                  for line in report["leaks"][label]["lines"][:20]) or "none", "",
        "## Summary", "", table, ""])


def write_report(out_dir: Path, report: dict, steps: list[Step], stock: dict, vl: dict) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    md = report_md(report)
    (out_dir / "soak.md").write_text(md)
    # Every request but the compared ones both servers answered alike (tens of thousands on an H200):
    # those only counted, so the file stays a few MB.
    requests, alike = [], 0
    for s in steps:
        a, b = stock.get(s.id), vl.get(s.id)
        if s.compare and a and b and a.get("status") == b.get("status") == 200 and a.get("texts") == b.get("texts"):
            alike += 1
            continue
        if a is None and b is None:
            continue
        requests.append({"id": s.id, "kind": s.kind, "name": s.name, "round": s.round, "expect": list(s.expect),
                         "salt": (s.body or {}).get("cache_salt"), "stock": a, "vlcache": b})
    (out_dir / "soak.json").write_text(json.dumps({"report": report, "compared_alike_not_listed": alike,
                                                   "requests": requests}, indent=1, default=str))
    return short_table(report)


def rereport(soak_json: Path, out_dir: Path) -> dict:
    """A saved run's report under today's rules (near ties, refusals both servers give alike), from its
    soak.json: every request not answered alike is listed there with both servers' results, so the
    mismatches and the unexpected statuses can be classified again; the counts stay the run's."""
    doc = json.loads(Path(soak_json).read_text())
    report, reqs = doc["report"], {r["id"]: r for r in doc["requests"]}
    cmp = report["compare"]
    entries = [mismatch(w["id"], w.get("salt"), w.get("n", 1), reqs[w["id"]]["stock"], reqs[w["id"]]["vlcache"])
               for w in cmp["wrong"] + cmp.get("near_ties", [])]
    cmp["wrong"] = [e for e in entries if not e["near_tie"]]
    cmp["near_ties"] = [e for e in entries if e["near_tie"]]
    for label, other in (("stock", "vlcache"), ("vlcache", "stock")):
        t = report["tally"][label]
        t.setdefault("as_other", {})
        t.setdefault("as_other_ids", [])
        keep = []
        for id_, why in t["unexpected_ids"]:
            r = reqs.get(id_) or {}
            if same_error(r.get(label), r.get(other)):
                status = str(r[label]["status"])
                t["unexpected"][status] -= 1
                t["as_other"][status] = t["as_other"].get(status, 0) + 1
                t["as_other_ids"].append([id_, why])
            else:
                keep.append([id_, why])
        t["unexpected_ids"] = keep
        t["unexpected"] = {k: v for k, v in t["unexpected"].items() if v}
    report["passed"], report["failures"] = verdict(report)
    report["meta"]["reclassified_from"] = str(soak_json)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "soak.md").write_text(report_md(report))
    (out_dir / "soak.json").write_text(json.dumps({**doc, "report": report}, indent=1, default=str))
    return report


# ----- main -------------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="make_eval --out-dir: <set>.jsonl files (required to soak)")
    p.add_argument("--rereport", default=None, metavar="SOAK_JSON",
                   help="no soak: write --out-dir/soak.{md,json} from a saved run's soak.json under today's rules")
    p.add_argument("--sets", default="A,B,multi")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--model", default=None, help="checkpoint to serve (with --log-dir; not with --*-url)")
    p.add_argument("--log-dir", default=None, help="server logs (keep them out of $OUT)")
    p.add_argument("--stock-url", default=None, help="a stock server already up (dry runs)")
    p.add_argument("--vlcache-url", default=None, help="a vlcache server already up (dry runs)")
    p.add_argument("--stock-log", default=None, help="with --stock-url: its log, for the leak reports")
    p.add_argument("--vlcache-log", default=None, help="with --vlcache-url: its log, for the leak reports")
    p.add_argument("--store-images", type=int, default=6,
                   help="--vlcache-mm-store-tokens in images' worth: small, so the stream evicts")
    p.add_argument("--image-tokens", type=int, default=None, help="tokens per image (default: read from the PNG)")
    p.add_argument("--vlcache-flags", default="", help="more flags for the vlcache server")
    p.add_argument("--rounds", type=int, default=200, help="at most; the deadline usually ends the stream first")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=6)
    p.add_argument("--timeout-s", type=float, default=30, help="per request")
    p.add_argument("--stream-s", type=float, default=150, help="the stream's length (or until --deadline-unix)")
    p.add_argument("--deadline-unix", type=float, default=None, help="no step starts after this")
    p.add_argument("--min-stream-s", type=float, default=45,
                   help="the stream runs at least this long even past --deadline-unix (slow server starts)")
    p.add_argument("--idle-s", type=float, default=8, help="idle after the stream: SGLang's idle leak check runs")
    p.add_argument("--health-every-s", type=float, default=1.0, help="/health poll interval per server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mem-fraction", type=float, default=0.3)
    p.add_argument("--max-total-tokens", type=int, default=65_536)
    p.add_argument("--chunked-prefill-size", type=int, default=256,
                   help="both servers: multi-image prompts (~250-400 tokens) prefill in chunks, an image's reuse "
                        "split across them, and aborts land mid-prefill (0: SGLang's default)")
    p.add_argument("--base-port", type=int, default=30200)
    p.add_argument("--server-timeout-s", type=float, default=360)
    p.add_argument("--progress", default=None, help="progress lines go here too")
    args = p.parse_args(argv)
    given = (args.stock_url is not None, args.vlcache_url is not None)
    if given not in ((True, True), (False, False)):
        p.error("--stock-url and --vlcache-url go together")
    if not given[0] and not args.rereport and not (args.model and args.log_dir):
        p.error("without --stock-url/--vlcache-url, --model and --log-dir are needed (the servers to launch)")
    if args.concurrency < 1 or args.rounds < 1 or args.store_images < 1:
        p.error("--concurrency, --rounds and --store-images must be >= 1")
    return args


def _progress(path: Optional[str]) -> Callable[[str], None]:
    t0, lock = time.monotonic(), threading.Lock()

    def note(line: str) -> None:
        line = f"[soak +{time.monotonic() - t0:.0f} s] {line}"
        print(line, flush=True)
        if path:
            with lock, open(path, "a") as f:
                f.write(line + "\n")

    return note


def load_records(data_dir: str, sets: str) -> list[accuracy.Record]:
    records = []
    for name in [s for s in sets.split(",") if s]:
        for rec in accuracy.load_dataset(Path(data_dir) / f"{name}.jsonl"):
            records.append(dataclasses.replace(rec, id=f"{name}-{rec.id}"))
    return records


def vlcache_flags(store_tokens: int, extra: str = "") -> list[str]:
    import shlex

    return launch.vlcache_flags("full") + ["--vlcache-mm-store-tokens", str(store_tokens)] + shlex.split(extra)


def soak(args: argparse.Namespace, stock_url: str, vl_url: str, logs: dict[str, Optional[Path]],
         procs_alive: Callable[[], dict], note: Callable[[str], None]) -> dict:
    """The probe, the stream, the idle wait and the report, against two servers that answer."""
    records = load_records(args.data_dir, args.sets)
    image_tokens = args.image_tokens or accuracy.image_tokens_of(next(r for r in records if r.images).images[0])
    # Not under --out-dir: $OUT comes back to the CPU machine, and a killed run would leave it there.
    big = make_large_file(Path(tempfile.gettempdir()) / f"vlcache-soak-large-{os.getpid()}.png")
    twin_url = next(r.images[0] for r in records if len(r.images) == 1)
    catalogue = hostile_catalogue(twin_url, big)
    odd = odd_valid_images()
    steps = [s for r in range(args.rounds) for s in plan_round(r, records, catalogue, odd, args.max_tokens, args.seed)]
    probe_steps = plan_probe(records, args.max_tokens)
    note(f"{len(records)} records, {image_tokens} tokens per image; {args.rounds} rounds planned "
         f"({len(steps)} steps, {sum(s.kind == 'hostile' for s in steps)} hostile)")
    deadline = time.time() + args.stream_s
    if args.deadline_unix is not None:  # but never less than --min-stream-s: a soak that sends nothing says nothing
        deadline = min(deadline, max(args.deadline_unix, time.time() + min(args.min_stream_s, args.stream_s)))
    t0 = time.monotonic()
    stock_stream = Stream("stock", stock_url, args.concurrency, args.timeout_s, deadline, stock=True, progress=note)
    vl_stream = Stream("vlcache", vl_url, args.concurrency, args.timeout_s, deadline, progress=note)
    try:
        with HealthPoller({"stock": stock_url, "vlcache": vl_url}, every_s=args.health_every_s) as health:
            launch.http_post(vl_url + "/flush_cache")
            probe = Stream("vlcache-probe", vl_url, 1, args.timeout_s, deadline, progress=note).run(probe_steps)
            vl_stream.results.update(probe)
            note(f"salt probe: {probe_verdict(probe, image_tokens)}")
            threads = [threading.Thread(target=stock_stream.run, args=(stock_steps(steps),)),
                       threading.Thread(target=vl_stream.run, args=(steps,))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            stream_s = time.monotonic() - t0
            note(f"stream done after {stream_s:.0f} s; idle {args.idle_s:.0f} s for the idle check")
            time.sleep(args.idle_s)
        gauges = {}
        status, body = launch.http_get(vl_url + "/metrics")
        if status == 200:
            gauges = launch.parse_vlcache_gauges(body)
        alive = procs_alive()
    finally:
        Path(big).unlink(missing_ok=True)
    leaks = {k: launch.leak_reports(p) if p else {"count": 0, "lines": [], "log": None} for k, p in logs.items()}
    meta = {"date": datetime.date.today().isoformat(), "model": args.model or "(given servers)",
            "vlcache_flags": " ".join(vlcache_flags(args.store_images * image_tokens, args.vlcache_flags)),
            "rounds_planned": args.rounds, "concurrency": args.concurrency, "stream_s": stream_s,
            "image_tokens": image_tokens, "store_tokens": args.store_images * image_tokens,
            "records": len(records), "chunked_prefill_size": args.chunked_prefill_size}
    report = build_report(steps, probe_steps, stock_stream.results, vl_stream.results, health, leaks, alive,
                          gauges, image_tokens, meta)
    table = write_report(Path(args.out_dir), report, steps + probe_steps, stock_stream.results, vl_stream.results)
    note("done")
    print(f"\nresults in {args.out_dir} (soak.md, soak.json)\n\n{table}", flush=True)
    return report


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    if args.rereport:
        report = rereport(Path(args.rereport), Path(args.out_dir))
        print(short_table(report), flush=True)
        return report
    if not args.data_dir:
        sys.exit("--data-dir is required (make_eval's sets), unless --rereport")
    note = _progress(args.progress)
    os.environ["SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE"] = "1"  # the servers inherit it: a leak raises
    if args.stock_url:
        logs = {"stock": Path(args.stock_log) if args.stock_log else None,
                "vlcache": Path(args.vlcache_log) if args.vlcache_log else None}
        return soak(args, args.stock_url, args.vlcache_url, logs, lambda: {"stock": None, "vlcache": None}, note)
    launch.stop_servers_on_sigterm()
    return run_with_servers(args, build_servers(args), note)


def build_servers(args: argparse.Namespace) -> list[launch.Server]:
    """(stock, vlcache full with a small store) on the checkpoint, the same SGLang flags otherwise."""
    from tiny_vlm import serve_eval

    records = load_records(args.data_dir, args.sets)
    image_tokens = args.image_tokens or accuracy.image_tokens_of(next(r for r in records if r.images).images[0])
    flags = serve_eval.server_flags(args.model, args.max_total_tokens)
    if args.chunked_prefill_size:
        flags += ["--chunked-prefill-size", str(args.chunked_prefill_size)]
    stock = launch.Server("stock", flags, args.base_port, args.log_dir, mem_fraction=args.mem_fraction,
                          timeout_s=args.server_timeout_s)
    vl = launch.Server("vlcache", flags + vlcache_flags(args.store_images * image_tokens, args.vlcache_flags),
                       args.base_port + 1, args.log_dir, mem_fraction=args.mem_fraction,
                       timeout_s=args.server_timeout_s)
    return [stock, vl]


def run_with_servers(args: argparse.Namespace, servers: list[launch.Server], note: Callable[[str], None]) -> dict:
    """Launch (stock, vlcache), soak them, stop them; the report is written whatever happens to a server."""
    stock, vl = servers
    try:
        with launch.running(servers):
            note(f"servers healthy: stock {stock.startup_s:.0f} s, vlcache {vl.startup_s:.0f} s")

            def alive() -> dict:
                return {s.label: s.proc is not None and s.proc.poll() is None for s in servers}

            return soak(args, stock.url, vl.url, {s.label: s.log_path for s in servers}, alive, note)
    finally:
        tails = "\n\n".join(f"===== {s.label}: {s.log_path}\n{launch.tail(s.log_path, 60)}" for s in servers)
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.out_dir) / "server_tails.txt").write_text(tails)


if __name__ == "__main__":
    report = main()
    sys.exit(0 if report["passed"] else 1)
