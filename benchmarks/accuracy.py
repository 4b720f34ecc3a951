"""Accuracy of servers on image QA sets, sent so that recurring images hit the vlcache store.

Servers side by side, one per policy (file order, one request at a time per server):

    python benchmarks/accuracy.py --dataset eval.jsonl --server stock=http://127.0.0.1:30000 \\
        --server full=http://127.0.0.1:30001 --server first_k:16=http://127.0.0.1:30002 \\
        --reference stock --out-dir DIR [--max-tokens 8] [--limit N]

One vlcache server, every (policy, recompute fraction) config by a per-request override, and a stock
server beside it (`sweep`, see `sweep_main`; what accuracy_bench.sh runs):

    python benchmarks/accuracy.py sweep --dataset A=A.jsonl --dataset B=B.jsonl --dataset multi=multi.jsonl \\
        --vlcache http://127.0.0.1:30101 --stock http://127.0.0.1:30100 --out-dir DIR

Dataset JSONL, one record per line: {"id", "prompt": "text <image> text", "images": [data URL or file
path (relative to the dataset's folder)], "answer", "system": optional, "history": optional earlier
turns [{"role": "user"|"assistant", "content": "..."}], "kind"/"layout": optional tags}; each `<image>`
in the prompt is where the next image goes. A server LABEL is `policy` or `policy:param`; the policy is
the plot series. Per server: exact-match accuracy (normalised), the same on repeat occurrences (records
whose images came earlier in the file: all of them in the side-by-side mode, at least one in `sweep`,
the same for single-image sets), agreement with the reference server, and the vlcache hit rate and
recomputed fraction over the run. Writes DIR/accuracy.{json,md} (+ accuracy.png with matplotlib).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime
import json
import mimetypes
import math
import string
import struct
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy_report as report  # noqa: E402
import launch  # noqa: E402
import plot  # noqa: E402

MARKER = "<image>"


# ----- dataset ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Record:
    id: str
    prompt: str
    images: list[str]  # data URLs
    answer: str
    system: Optional[str] = None
    history: list[dict] = dataclasses.field(default_factory=list)  # earlier turns {"role", "content": str}
    kind: Optional[str] = None  # tags for per-kind tables
    layout: Optional[str] = None
    repeat: bool = False  # every image of it appeared in an earlier record
    n_reused: int = 0  # how many of its (distinct) images appeared in an earlier record

    def messages(self) -> list[dict]:
        """Chat messages: system, earlier turns, then the prompt's text pieces with the images at the markers."""
        content: list[dict] = []
        for i, text in enumerate(self.prompt.split(MARKER)):
            if text:
                content.append({"type": "text", "text": text})
            if i < len(self.images):
                content.append({"type": "image_url", "image_url": {"url": self.images[i]}})
        messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        return messages + [dict(t) for t in self.history] + [{"role": "user", "content": content}]


def image_data_url(ref: str, base_dir: Path) -> str:
    """A data URL as is; a file path (relative to base_dir) read into one."""
    if ref.startswith("data:"):
        if not ref.startswith("data:image/") or ";base64," not in ref:
            raise ValueError(f"not a base64 image data URL: {ref[:40]}...")
        return ref
    path = Path(ref) if Path(ref).is_absolute() else base_dir / ref
    if not path.is_file():
        raise ValueError(f"image file not found: {path}")
    mime = mimetypes.guess_type(path.name)[0]
    if not mime or not mime.startswith("image/"):
        raise ValueError(f"not an image file name (by its suffix): {path}")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def parse_record(obj: Any, base_dir: Path) -> Record:
    if not isinstance(obj, dict):
        raise ValueError(f"a record must be a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("id", "prompt", "images", "answer") if k not in obj]
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    if not isinstance(obj["prompt"], str) or not isinstance(obj["answer"], str):
        raise ValueError("prompt and answer must be strings")
    if not isinstance(obj["images"], list) or not all(isinstance(i, str) for i in obj["images"]):
        raise ValueError("images must be a list of strings")
    if obj.get("system") is not None and not isinstance(obj["system"], str):
        raise ValueError("system must be a string")
    history = obj.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(t, dict) and t.get("role") in ("user", "assistant") and isinstance(t.get("content"), str)
            and set(t) == {"role", "content"} for t in history):
        raise ValueError('history must be a list of {"role": "user"|"assistant", "content": "text"}')
    for tag in ("kind", "layout"):
        if obj.get(tag) is not None and not isinstance(obj[tag], str):
            raise ValueError(f"{tag} must be a string")
    markers = obj["prompt"].count(MARKER)
    if markers != len(obj["images"]):
        raise ValueError(f"the prompt has {markers} {MARKER} marker(s) but there are {len(obj['images'])} image(s)")
    images = [image_data_url(ref, base_dir) for ref in obj["images"]]
    return Record(str(obj["id"]), obj["prompt"], images, obj["answer"], obj.get("system"), history,
                  obj.get("kind"), obj.get("layout"))


def load_dataset(path: str | Path, limit: Optional[int] = None) -> list[Record]:
    """Records in file order (the first `limit`), repeat occurrences marked; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"dataset not found: {path}")
    records, ids, seen_images = [], set(), set()
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(records) >= limit:
                break
            if not line.strip():
                continue
            try:
                rec = parse_record(json.loads(line), path.parent)
            except (ValueError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
            if rec.id in ids:
                raise ValueError(f"{path}:{lineno}: duplicate id {rec.id!r}")
            ids.add(rec.id)
            rec.repeat = bool(rec.images) and all(url in seen_images for url in rec.images)
            rec.n_reused = sum(url in seen_images for url in set(rec.images))
            seen_images.update(rec.images)
            records.append(rec)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def normalise(answer: str) -> str:
    """Exact-match form: stripped, lower-case, no trailing punctuation."""
    return answer.strip().lower().rstrip(string.punctuation + " \t\n").strip()


# ----- servers ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Target:
    label: str  # policy or policy:param
    url: str

    @property
    def policy(self) -> str:
        return self.label.partition(":")[0]

    @property
    def param(self) -> Optional[str]:
        return self.label.partition(":")[2] or None


def parse_server(spec: str) -> Target:
    label, sep, url = spec.partition("=")
    if not sep or not label or not url.startswith(("http://", "https://")):
        raise ValueError(f"--server wants LABEL=http://HOST:PORT, got {spec!r}")
    return Target(label, url.rstrip("/"))


def post_chat(url: str, body: dict, timeout_s: float = 300) -> dict:
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"HTTP {e.code}: {e.read()[:300]!r}") from None


def fetch_gauges(url: str) -> dict[str, float]:
    status, body = launch.http_get(url + "/metrics")
    return launch.parse_vlcache_gauges(body) if status == 200 else {}


def first_top_logprobs(response: dict) -> Optional[list[tuple[str, float]]]:
    """The first generated token's top logprobs [(token, logprob), ...] in an OpenAI chat response
    (`logprobs: true, top_logprobs: k`); None when the response has none."""
    try:
        content = response["choices"][0]["logprobs"]["content"]
        return [(str(t["token"]), float(t["logprob"])) for t in content[0]["top_logprobs"]] or None
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def chat_body(rec: Record, max_tokens: int, override: Optional[dict] = None, top_logprobs: int = 0) -> dict:
    """The chat-completions request: greedy; with top_logprobs the first tokens' top-k logprobs; with an
    override the vlcache per-request config (`custom_params.vlcache`: policy, recompute_ratio, first_k,
    error_bound), which a stock server never gets."""
    body: dict = {"model": "default", "messages": rec.messages(), "max_tokens": max_tokens, "temperature": 0}
    if top_logprobs:
        body.update(logprobs=True, top_logprobs=top_logprobs)
    if override is not None:
        body["custom_params"] = {"vlcache": dict(override)}
    return body


def ask(target: Target, rec: Record, max_tokens: int, override: Optional[dict] = None, top_logprobs: int = 0,
        timeout_s: float = 300) -> dict:
    body = chat_body(rec, max_tokens, override, top_logprobs)
    t0 = time.perf_counter()
    top, finish = None, None
    try:
        response = post_chat(target.url, body, timeout_s=timeout_s)
        text = response["choices"][0]["message"]["content"] or ""
        finish = response["choices"][0].get("finish_reason")
        top = first_top_logprobs(response) if top_logprobs else None
        error = None
    except (RuntimeError, OSError, KeyError, IndexError, ValueError, TypeError) as e:
        text, error = "", f"{type(e).__name__}: {e}"
    out = {"id": rec.id, "server": target.label, "text": text, "answer": normalise(text),
           "correct": error is None and normalise(text) == normalise(rec.answer), "repeat": rec.repeat,
           "latency_s": round(time.perf_counter() - t0, 4), "error": error, "finish_reason": finish}
    if top_logprobs:
        out.update(top=top, n_reused=rec.n_reused, kind=rec.kind, layout=rec.layout)
    return out


def run_server(target: Target, records: list[Record], max_tokens: int) -> tuple[list[dict], dict]:
    """All records in file order against one server, and its vlcache gauges over the run."""
    before = fetch_gauges(target.url)
    results = [ask(target, rec, max_tokens) for rec in records]
    return results, launch.gauge_deltas(before, fetch_gauges(target.url))


# ----- summary ----------------------------------------------------------------------------------

def mean_or_none(xs: list) -> Optional[float]:
    """The mean of xs (booleans: the share True), None for none."""
    return sum(xs) / len(xs) if xs else None


def answer_prior(answers: list[str]) -> float:
    """Share of `answers` equal to the commonest one: what a model that reads nothing scores by always
    giving it (the row checkpoints did exactly that)."""
    if not answers:
        raise ValueError("no answers")
    normal = [normalise(a) for a in answers]
    return max(normal.count(a) for a in set(normal)) / len(normal)


PRIOR_MARGIN = 0.02  # an accuracy this close to the answer prior: the model reads nothing from the image


def at_prior(accuracy: float, prior: float) -> bool:
    """True when `accuracy` does not clear the answer prior by PRIOR_MARGIN (the model ignores the image)."""
    return accuracy <= prior + PRIOR_MARGIN


def summarise(target: Target, results: list[dict], reference: list[dict], window: dict[str, float]) -> dict:
    ref = {r["id"]: r for r in reference}
    agree = [r["error"] is None and ref[r["id"]]["error"] is None and r["answer"] == ref[r["id"]]["answer"]
             for r in results]
    repeats = [r["correct"] for r in results if r["repeat"]]
    return {"server": target.label, "policy": target.policy, "param": target.param, "n": len(results),
            "n_errors": sum(r["error"] is not None for r in results),
            "accuracy": mean_or_none([r["correct"] for r in results]), "n_repeat": len(repeats),
            "repeat_accuracy": mean_or_none(repeats), "agreement": mean_or_none(agree),
            "recomputed_fraction": window.get("recomputed_fraction"),
            "hit_rate": window.get("hit_rate"), "reused_tokens": window.get("reused_tokens"),
            "recomputed_tokens": window.get("recomputed_tokens")}


def table_md(summary: list[dict], reference: str) -> str:
    lines = [f"| server | n | accuracy | accuracy on repeats (n) | agreement with {reference} | "
             "recomputed fraction | hit rate | errors |", "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['server']} | {s['n']} | {report.fmt(s['accuracy'], '.3f')} | "
                     f"{report.fmt(s['repeat_accuracy'], '.3f')} ({s['n_repeat']}) | {report.fmt(s['agreement'], '.3f')} | "
                     f"{report.fmt(s['recomputed_fraction'], '.3f')} | {report.fmt(s['hit_rate'], '.2f')} | {s['n_errors']} |")
    return "\n".join(lines)


def report_md(meta: dict, summary: list[dict]) -> str:
    return "\n".join([
        f"# Accuracy: {meta['dataset']}, {meta['date']}", "",
        f"{meta['n']} records ({meta['n_repeat']} repeat occurrences: all their images came earlier in the file), "
        f"sent to each server in file order, greedy, max {meta['max_tokens']} tokens. Accuracy: exact match "
        "after strip, lower-case and dropping trailing punctuation. Agreement: same normalised answer as the "
        "reference server. Recomputed fraction and hit rate: vlcache gauges over the run (– for stock, or "
        "when nothing was reused).", "", table_md(summary, meta["reference"]), ""])


# ----- sweep: one vlcache server, every config by a per-request override ------------------------

# Recompute fractions of the issue's sweep, and the order in which they run: when the time budget runs
# short, the budgets that rank policies (5 %, 2 %, 20 %) are measured first and the rest are skipped.
FRACTIONS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
FRACTION_ORDER = (0.05, 0.02, 0.2, 0.1, 0.5, 0.01, 0.0)
RATIO_POLICIES = ("first_k", "vlcache", "cacheblend")
BOUNDED_POLICIES = ("error_bounded", "image_bounded")  # the bound decides the fraction; the ratio is the floor
KNOB_DELAY = 3  # tiers
HARD_GRACE_S = 20.0
RESTART_ROOM_S = 120.0  # a restart (stop, start, /health) and a pass must fit before the deadline
TOKEN_PX = 28  # one merged Qwen2.5-VL image token: 14-px patches merged 2x2


@dataclasses.dataclass(frozen=True)
class Config:
    """One pass of a data set through the vlcache server, the policy set by the request override."""

    label: str  # accuracy.py label: policy or policy:param (first_k:K, vlcache:R, error_bounded:TAU)
    policy: str  # the policy, or policy/sS for a bounded policy whose check samples share S (a plot line of its own)
    fraction: Optional[float]  # the recompute fraction asked for (None: error_bounded, set by its bound)
    override: Optional[dict]  # custom_params.vlcache; None for the stock server
    tier: int  # run order: lower first

    @property
    def param(self) -> Optional[str]:
        return self.label.partition(":")[2] or None

    @property
    def family(self) -> str:
        """The policy without a check sample's suffix."""
        return self.policy.partition("/")[0]


def _tier(fraction: float) -> int:
    return 2 + (FRACTION_ORDER.index(fraction) if fraction in FRACTION_ORDER else len(FRACTION_ORDER))


def plan_configs(fractions: tuple[float, ...] | list[float] = FRACTIONS, image_tokens: int = 64,
                 error_bounds: tuple[float, ...] | list[float] = (), error_floor: float = 0.02,
                 policies: tuple[str, ...] = RATIO_POLICIES,
                 bounded_policies: tuple[str, ...] = ("error_bounded",),
                 check_samples: tuple[float, ...] | list[float] = (1.0,)) -> list[Config]:
    """full (the reference), none, each ratio policy at each fraction, each bounded policy at each bound
    and check sample (its recompute_ratio is the floor; a sample below 1 probes: policy/sS), in run order. first_k's k = round(fraction x image tokens); a k that
    is 0 (= none) or all tokens (= full), or that an earlier fraction already gave, is left out."""
    bad = [f for f in fractions if not 0.0 <= f <= 1.0] + [t for t in error_bounds if t < 0]
    bad += [x for x in check_samples if not 0.0 < x <= 1.0]
    if bad or not 0.0 <= error_floor <= 1.0:
        raise ValueError(f"fractions and the floor must be in [0, 1] and bounds >= 0; got {bad or error_floor}")
    unknown = [p for p in policies if p not in RATIO_POLICIES] + [p for p in bounded_policies if p not in BOUNDED_POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; ratio: {RATIO_POLICIES}, bounded: {BOUNDED_POLICIES}")
    configs = [Config("full", "full", 1.0, {"policy": "full"}, 0), Config("none", "none", 0.0, {"policy": "none"}, 1)]
    seen = {"full", "none"}
    for f in sorted(fractions, key=lambda f: (_tier(f), f)):
        for policy in policies:
            if policy == "first_k":
                k = round(f * image_tokens)
                label, override = f"first_k:{k}", {"policy": "first_k", "first_k": k}
                if k == 0 or k >= image_tokens:
                    continue
            else:
                label, override = f"{policy}:{f:g}", {"policy": policy, "recompute_ratio": f}
            if label not in seen:
                seen.add(label)
                configs.append(Config(label, policy, f, override, _tier(f)))
    for i, tau in enumerate(error_bounds):
        for policy in bounded_policies:
            for share in check_samples:
                name = policy if share == 1.0 else f"{policy}/s{share:g}"
                # the share always travels: the server's default is a probe, a plain check must say 1
                override = {"policy": policy, "error_bound": tau, "recompute_ratio": error_floor,
                            "check_sample": share}
                configs.append(Config(f"{name}:{tau:g}", name, None, override, 2 + i))
    return sorted(configs, key=lambda c: c.tier)


def knob_subset(configs: list[Config], fractions: tuple[float, ...] | list[float]) -> list[Config]:
    """The configs the knob data sets run: full, none, each ratio policy at `fractions`, the first bound."""
    first_tier = min((c.tier for c in configs if c.family in BOUNDED_POLICIES), default=None)
    bounds = [c for c in configs if c.family in BOUNDED_POLICIES and c.tier == first_tier]
    return [c for c in configs if c.policy in ("full", "none") or c in bounds
            or (c.fraction in fractions and c.family not in BOUNDED_POLICIES)]


def image_tokens_of(data_url: str) -> int:
    """Merged image tokens of a PNG data URL, read from its header, assuming the processor does not
    resize it (true for tiny_vlm's checkpoints); other formats need --image-tokens."""
    raw = base64.b64decode(data_url.split(",", 1)[1][:44])  # 33 bytes: signature and IHDR size
    if raw[:8] != b"\x89PNG\r\n\x1a\n" or len(raw) < 24:
        raise ValueError("not a PNG: pass --image-tokens")
    width, height = struct.unpack(">II", raw[16:24])
    return (width // TOKEN_PX) * (height // TOKEN_PX)


def phases(records: list[Record]) -> list[list[Record]]:
    """Records in waves that may run concurrently: a record runs after every record that first held
    one of its images (so that image is in the store), its new images first come in its own wave.
    Single-image sets: wave 0 the first occurrences, wave 1 every repeat."""
    intro: dict[str, int] = {}
    waves: list[list[Record]] = []
    for rec in records:
        wave = max((intro[u] + 1 for u in rec.images if u in intro), default=0)
        for u in rec.images:
            intro.setdefault(u, wave)
        while len(waves) <= wave:
            waves.append([])
        waves[wave].append(rec)
    return waves


def flush_cache(url: str, tries: int = 20, wait_s: float = 0.25) -> None:
    """POST /flush_cache (radix cache and the vlcache store); SGLang refuses while requests run, so retry."""
    status, body = 0, ""
    for _ in range(tries):
        status, body = launch.http_post(url + "/flush_cache")
        if status == 200:
            return
        time.sleep(wait_s)
    raise RuntimeError(f"POST {url}/flush_cache answered {status} {tries} times: {body[:200]!r}")


NOT_SENT = "not sent: "  # the error of a request a cut-short pass never sent (no answer to score)


def was_sent(result: dict) -> bool:
    """False for a request run_pass never sent: it scores nothing, right or wrong."""
    return not (result.get("error") or "").startswith(NOT_SENT)


def _not_sent(target: Target, rec: Record, why: str) -> dict:
    return {"id": rec.id, "server": target.label, "text": "", "answer": "", "correct": False, "repeat": rec.repeat,
            "latency_s": 0.0, "error": why, "top": None, "n_reused": rec.n_reused, "kind": rec.kind,
            "layout": rec.layout}


def nudge_gauges(url: str) -> None:
    """One text-only request, so the server publishes what its last batch counted: the per-layer
    recompute counters are added after a forward but exported when the next batch is planned, so
    without this the pass's last batch would land in the next pass's window."""
    body = {"model": "default", "messages": [{"role": "user", "content": "Hello."}], "max_tokens": 1,
            "temperature": 0}
    try:
        post_chat(url, body, timeout_s=30)
    except (RuntimeError, OSError, ValueError):
        pass  # the gauges read next say what they say; a dead server shows in the pass's errors


def run_pass(target: Target, waves: list[list[Record]], max_tokens: int, concurrency: int,
             override: Optional[dict], top_logprobs: int, flush: bool, timeout_s: float = 120,
             stop_at: Optional[float] = None) -> tuple[list[dict], dict]:
    """One config over a data set: flush, then wave by wave with `concurrency` requests in flight; the
    gauges over the pass (and `first_wave_hits`: store hits in wave 0, 0 when the flush emptied it).
    After a request times out, or past `stop_at` (UNIX s), the pass's remaining requests are not sent:
    a hung server must not hold the run past its time limit, one timeout per worker at a time."""
    if flush:
        flush_cache(target.url)
    before = fetch_gauges(target.url)
    abort = threading.Event()

    def one(rec: Record) -> dict:
        if not abort.is_set() and stop_at is not None and time.time() > stop_at:
            abort.set()
        if abort.is_set():
            return _not_sent(target, rec, NOT_SENT + "the pass was cut short (a request hit --timeout-s, "
                                          "or past the deadline)")
        out = ask(target, rec, max_tokens, override, top_logprobs, timeout_s)
        if out["error"] and "timed out" in out["error"]:
            abort.set()
        return out

    results, after_first = [], None
    with ThreadPoolExecutor(concurrency) as pool:
        for i, wave in enumerate(waves):
            results += pool.map(one, wave)
            if i == 0:
                after_first = fetch_gauges(target.url)
    nudge_gauges(target.url)
    window = launch.gauge_deltas(before, fetch_gauges(target.url))
    if after_first:  # {} from a stock server
        window["first_wave_hits"] = after_first.get("key_hits", 0.0) - before.get("key_hits", 0.0)
    return results, window


def first_token_kl(ref: Optional[list], other: Optional[list], eps: float = 1e-9) -> Optional[float]:
    """KL(ref || other) of two first-token distributions known by their top-k logprobs only.

    Approximation: both are coarse-grained to ref's top-k tokens plus one bucket for every other token
    (its mass 1 - the listed mass), which by itself gives a lower bound of the true KL (data processing);
    a ref token missing from other's top-k gets other's k-th (smallest listed) probability, an upper
    bound on its true probability, which lowers the estimate further. So: a lower-bound estimate, exact
    0 when the two lists agree. Tokens are matched by their text (duplicates summed)."""
    if not ref or not other:
        return None

    def probs(top: list) -> dict[str, float]:
        out: dict[str, float] = {}
        for token, lp in top:
            out[token] = out.get(token, 0.0) + math.exp(lp)
        return out

    p, q_listed = probs(ref), probs(other)
    floor = min(q_listed.values())
    q = {t: q_listed.get(t, floor) for t in p}
    p_sum, q_sum = sum(p.values()), sum(q.values())
    if p_sum > 1.0:  # rounding in the server's logprobs
        p = {t: v / p_sum for t, v in p.items()}
        p_sum = 1.0
    if q_sum > 1.0:  # the floors overcounted (or rounding): keep q a distribution
        q = {t: v / q_sum for t, v in q.items()}
        q_sum = 1.0
    kl = sum(v * math.log(v / q[t]) for t, v in p.items() if v > 0)
    p_rest, q_rest = 1.0 - p_sum, 1.0 - q_sum
    if p_rest > 0:
        kl += p_rest * math.log(p_rest / max(q_rest, eps))
    return max(kl, 0.0)


def summarise_config(config: Config, results: list[dict], reference: Optional[list[dict]], window: dict,
                     elapsed_s: float, all_records: bool = False) -> dict:
    """One row: accuracy (all, on repeats = records with a reused image), agreement with and first-token
    KL against the reference (`full`) on repeats (all records for the stock row), gauges over the pass."""
    ref = {r["id"]: r for r in reference} if reference else {}
    repeats = [r for r in results if r.get("n_reused", 0) > 0]
    scored = results if all_records else repeats
    pairs = [(r, ref[r["id"]]) for r in scored if r["id"] in ref]
    agree = [r["error"] is None and f["error"] is None and r["answer"] == f["answer"] for r, f in pairs]
    kls = [k for k in (first_token_kl(f.get("top"), r.get("top")) for r, f in pairs) if k is not None]
    errors = [r["error"] for r in results if r["error"] is not None]
    return {"server": config.label, "config": config.label, "policy": config.policy, "param": config.param,
            "fraction": config.fraction, "n": len(results), "n_errors": len(errors),
            "error": errors[0] if errors else None,
            "accuracy": mean_or_none([r["correct"] for r in results]) if len(errors) < len(results) else None,
            "n_repeat": len(repeats),
            "repeat_accuracy": mean_or_none([r["correct"] for r in repeats]) if len(errors) < len(results) else None,
            "agreement": mean_or_none(agree) if ref and len(errors) < len(results) else None, "agreement_n": len(pairs),
            "kl_mean": sum(kls) / len(kls) if kls else None, "kl_max": max(kls) if kls else None,
            "recomputed_fraction": window.get("recomputed_fraction"), "hit_rate": window.get("hit_rate"),
            "reused_tokens": window.get("reused_tokens"), "recomputed_tokens": window.get("recomputed_tokens"),
            "first_wave_hits": window.get("first_wave_hits"), "elapsed_s": round(elapsed_s, 2)}


def skipped_row(config: Config, why: str) -> dict:
    return {"server": config.label, "config": config.label, "policy": config.policy, "param": config.param,
            "fraction": config.fraction, "n": 0, "n_errors": 0, "error": why, "accuracy": None, "n_repeat": 0,
            "repeat_accuracy": None, "agreement": None, "kl_mean": None, "kl_max": None,
            "recomputed_fraction": None, "hit_rate": None, "skipped": True}


def _floats(text: str, scale: float = 1.0) -> list[float]:
    return [round(float(x) * scale, 10) for x in text.split(",") if x.strip()]


def _named(spec: str, flag: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"{flag} wants NAME=FILE, got {spec!r}")
    return name, path


def parse_sweep_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="accuracy.py sweep", description=sweep_main.__doc__.split("\n\n")[0])
    p.add_argument("--dataset", action="append", required=True, metavar="NAME=FILE", help="every config")
    p.add_argument("--knob-dataset", action="append", default=[], metavar="NAME=FILE",
                   help="the --knob-fractions configs only (the A-B knob's inner points)")
    p.add_argument("--vlcache", required=True, help="URL of the vlcache server (any default policy)")
    p.add_argument("--stock", default=None, help="URL of a stock server: the exactness row")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--fractions", default="0,1,2,5,10,20,50", help="recompute fractions in percent")
    p.add_argument("--policies", default=",".join(RATIO_POLICIES), help="ratio policies to sweep")
    p.add_argument("--error-bounds", default="0.1,0.25,0.05,0.5",
                   help="error_bounded's bounds τ: the largest relative K/V error at the check layer served from "
                        "cache (run in this order when time is short)")
    p.add_argument("--error-floor", type=float, default=0.02, help="error_bounded's recompute_ratio (its floor)")
    p.add_argument("--bounded-policies", default="error_bounded",
                   help=f"policies run at each --error-bounds value (of {', '.join(BOUNDED_POLICIES)})")
    p.add_argument("--check-samples", default="1",
                   help="bounded policies' check samples (share of each image the check measures; below 1 a "
                        "probe pass replans the request), each a config of its own")
    p.add_argument("--knob-fractions", default="5", help="percent; the knob data sets' configs")
    p.add_argument("--image-tokens", type=int, default=None, help="tokens per image (default: read from the PNG)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--top-logprobs", type=int, default=20)
    p.add_argument("--timeout-s", type=float, default=60,
                   help="per request; after a timeout the rest of that pass is not sent")
    p.add_argument("--deadline-unix", type=float, default=None,
                   help="start no pass that would end after this time (UNIX seconds); those are reported skipped")
    p.add_argument("--progress", default=None, help="append a line per pass to this file")
    args = p.parse_args(argv)
    try:
        args.sets = [_named(s, "--dataset") for s in args.dataset]
        args.knob_sets = [_named(s, "--knob-dataset") for s in args.knob_dataset]
        args.plan_fractions = _floats(args.fractions, 0.01)
        args.knob_fraction_list = _floats(args.knob_fractions, 0.01)
        args.bounds = _floats(args.error_bounds)
        args.samples = _floats(args.check_samples)
    except ValueError as e:
        p.error(str(e))
    names = [n for n, _ in args.sets + args.knob_sets]
    if len(set(names)) != len(names):
        p.error(f"data set names must be distinct: {names}")
    if args.concurrency < 1 or args.max_tokens < 1 or args.top_logprobs < 0:
        p.error("--concurrency and --max-tokens must be >= 1, --top-logprobs >= 0")
    return args


class _Progress:
    def __init__(self, path: Optional[str]):
        self.path, self.t0, self.lock = path, time.monotonic(), threading.Lock()

    def __call__(self, line: str) -> None:
        line = f"[sweep +{time.monotonic() - self.t0:.0f} s] {line}"
        print(line, flush=True)
        if self.path:
            with self.lock, open(self.path, "a") as f:
                f.write(line + "\n")


def sweep_main(argv: Optional[list[str]] = None, restart: Optional[Callable[[], None]] = None,
               max_restarts: int = 2) -> dict:
    """Every (policy, recompute fraction) config through one vlcache server by per-request overrides.

    Per data set and config: POST /flush_cache, then the records wave by wave (`phases`: first
    occurrences before the repeats that reuse them), `--concurrency` requests in flight, greedy, the
    first token's top logprobs. `full` runs first: the reference for agreement and first-token KL
    (`first_token_kl`). A stock server, if given, runs every data set once beside it (exactness row).
    A config that fails is recorded with its error and the sweep goes on; if the vlcache server is down
    after a pass, `restart` (the launcher's, from serve_eval; at most max_restarts times) brings it
    back, else the remaining passes are reported skipped, as they are past --deadline-unix.
    Writes DIR/<set>/accuracy.{json,md,png} (plot: accuracy on repeats vs measured recomputed
    fraction, one line per policy), DIR/knob.{json,png} (accuracy on repeats vs the share of layout-a
    records), DIR/sweep.{json,md}, DIR/summary.md; prints the short summary table last."""
    args = parse_sweep_args(argv)
    progress = _Progress(args.progress)
    sets: dict[str, dict] = {}
    for name, path in args.sets + args.knob_sets:
        try:
            records = load_dataset(path)
        except ValueError as e:
            raise SystemExit(f"bad dataset {name}: {e}") from None
        layouts = [r.layout for r in records]
        # The A-B knob's position: single-image sets whose records all say layout a or b.
        a_share = sum(x == "a" for x in layouts) / len(layouts) if set(layouts) <= {"a", "b"} else None
        sets[name] = {"path": path, "records": records, "waves": phases(records), "a_share": a_share,
                      "knob": (name, path) in args.knob_sets}
    first = next(r for s in sets.values() for r in s["records"] if r.images)
    image_tokens = args.image_tokens or image_tokens_of(first.images[0])
    plan = plan_configs(args.plan_fractions, image_tokens, args.bounds, args.error_floor,
                        tuple(x for x in args.policies.split(",") if x),
                        tuple(x for x in args.bounded_policies.split(",") if x), args.samples)
    knob_plan = knob_subset(plan, args.knob_fraction_list)
    jobs = [(c, n) for c in plan for n, s in sets.items() if not s["knob"] or c in knob_plan]
    # Stable: data set order within a tier; the knob's inner points after the main sets' 2 % and 20 %.
    jobs.sort(key=lambda j: j[0].tier + (KNOB_DELAY if sets[j[1]]["knob"] else 0))
    progress(f"{len(plan)} configs, {len(jobs)} passes over {len(sets)} data sets "
             f"({sum(len(s['records']) for s in sets.values())} records); image tokens {image_tokens}")

    stock_runs: dict[str, tuple[list[dict], float]] = {}
    # A pass that started in time but runs long is cut HARD_GRACE_S after the deadline.
    stop_at = args.deadline_unix + HARD_GRACE_S if args.deadline_unix is not None else None

    def run_stock() -> None:
        for name, s in sets.items():
            t0 = time.monotonic()
            try:
                res, _ = run_pass(Target("stock", args.stock.rstrip("/")), s["waves"], args.max_tokens,
                                  args.concurrency, None, args.top_logprobs, flush=False, timeout_s=args.timeout_s,
                                  stop_at=stop_at)
            except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
                res = [{"id": r.id, "server": "stock", "error": f"{type(e).__name__}: {e}", "correct": False,
                        "answer": "", "n_reused": r.n_reused} for r in s["records"]]
            stock_runs[name] = (res, time.monotonic() - t0)
            progress(f"{name} stock: {time.monotonic() - t0:.1f} s")

    stock_thread = threading.Thread(target=run_stock, daemon=True) if args.stock else None
    if stock_thread:
        stock_thread.start()
    runs: dict[tuple[str, str], dict] = {}
    per_record_s: dict[str, float] = {}
    vl = Target("vlcache", args.vlcache.rstrip("/"))
    down, restarts = None, 0
    for config, name in jobs:
        s = sets[name]
        est = per_record_s.get(name, 0.0) * len(s["records"])
        if down or (args.deadline_unix is not None and time.time() + est > args.deadline_unix):
            runs[(name, config.label)] = {"skipped": down or "time budget"}
            continue
        t0 = time.monotonic()
        try:
            res, window = run_pass(Target(config.label, vl.url), s["waves"], args.max_tokens, args.concurrency,
                                   config.override, args.top_logprobs, flush=True, timeout_s=args.timeout_s,
                                   stop_at=stop_at)
        except Exception as e:  # noqa: BLE001 - one config failing must not end the run
            res, window = [], {"error": f"{type(e).__name__}: {e}"}
        elapsed = time.monotonic() - t0
        runs[(name, config.label)] = {"results": res, "window": window, "elapsed_s": elapsed}
        if res:
            per_record_s[name] = elapsed / len(res)
        n_err = sum(r["error"] is not None for r in res) if res else None
        acc = mean_or_none([r["correct"] for r in res if r.get("n_reused", 0) > 0]) if res else None
        progress(f"{name} {config.label}: {elapsed:.1f} s, repeats acc {report.fmt(acc, '.3f')}, recomputed "
                 f"{report.fmt(window.get('recomputed_fraction'), '.3f')}, errors {n_err if res else window.get('error')}")
        if (not res or n_err) and launch.http_get(vl.url + "/health", timeout_s=10)[0] != 200:
            why = f"vlcache server down after {name} {config.label}"
            runs[(name, config.label)]["crashed"] = True
            room = args.deadline_unix is None or time.time() + RESTART_ROOM_S < args.deadline_unix
            if restart is not None and restarts < max_restarts and room:
                restarts += 1
                progress(f"{why}: restarting it ({restarts} of at most {max_restarts})")
                try:
                    restart()
                    progress("vlcache server back")
                except Exception as e:  # noqa: BLE001
                    down = f"{why}; restart failed: {type(e).__name__}: {str(e)[:200]}"
            else:
                down = why if room else f"{why}, too close to the deadline to restart it"
            if down:
                progress(f"{down}: the remaining passes are skipped")
    if stock_thread:
        stock_thread.join()
    return write_sweep(args, sets, plan, runs, stock_runs, image_tokens)


def _reading_order(c: Config) -> tuple:
    """Tables list full, none, then each policy by its fraction (a bounded policy by its bound)."""
    order = ("full", "none", *RATIO_POLICIES, *BOUNDED_POLICIES)
    value = c.fraction if c.fraction is not None else float(c.param or 0)
    return (order.index(c.family) if c.family in order else len(order), c.policy, value)


def write_sweep(args: argparse.Namespace, sets: dict, plan: list[Config], runs: dict, stock_runs: dict,
                image_tokens: int) -> dict:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    all_rows: dict[str, list[dict]] = {}
    stock_rows: dict[str, Optional[dict]] = {}
    sections = []
    for name, s in sets.items():
        full = runs.get((name, "full"), {}).get("results")
        full_top = {f["id"]: f.get("top") for f in full or []}
        rows, requests = [], []
        for config in sorted(plan, key=_reading_order):
            run = runs.get((name, config.label))
            if run is None:
                continue
            if "skipped" in run:
                rows.append(skipped_row(config, f"skipped: {run['skipped']}"))
                continue
            if not run["results"]:
                rows.append({**skipped_row(config, run["window"].get("error")), "skipped": False, "n_errors": 1})
                continue
            rows.append(summarise_config(config, run["results"], full, run["window"], run["elapsed_s"]))
            if run.get("crashed"):
                rows[-1]["error"] = f"the server went down during this pass: {rows[-1]['error']}"
            for r in run["results"]:
                kl = first_token_kl(full_top.get(r["id"]), r.get("top"))
                requests.append({**{k: v for k, v in r.items() if k != "top"}, "kl": kl})
        stock = None
        if name in stock_runs:
            res, elapsed = stock_runs[name]
            stock = summarise_config(Config("stock", "stock", None, None, -1), res, full, {}, elapsed, all_records=True)
            requests += [{k: v for k, v in r.items() if k != "top"} for r in res]
        all_rows[name], stock_rows[name] = rows, stock
        meta = {"dataset": name, "path": s["path"], "date": datetime.date.today().isoformat(),
                "n": len(s["records"]), "n_repeat": sum(r.n_reused > 0 for r in s["records"]),
                "waves": len(s["waves"]), "image_tokens": image_tokens, "a_share": s["a_share"],
                "expected_hit_rate": (sum(r.n_reused for r in s["records"])
                                      / max(1, sum(len(set(r.images)) for r in s["records"]))),
                "reference": "full", "max_tokens": args.max_tokens, "top_logprobs": args.top_logprobs,
                "concurrency": args.concurrency, "plot_y": "repeat_accuracy", "error_floor": args.error_floor}
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        summary = rows + ([stock] if stock else [])
        (d / "accuracy.json").write_text(json.dumps({"meta": meta, "summary": summary, "requests": requests}, indent=1))
        section = report.dataset_md(name, meta, rows, stock, requests)
        (d / "accuracy.md").write_text(f"# Accuracy sweep: {name}, {meta['date']}\n\n{report.SWEEP_NOTE}\n\n{section}")
        plot.try_plot("accuracy", d)
        sections.append(section)
    knob = report.knob_data(sets, all_rows)
    if knob["shares"]:
        (out / "knob.json").write_text(json.dumps(knob, indent=1))
        plot.try_plot("knob", out)
    main_sets = [n for n, s in sets.items() if not s["knob"]]
    table = report.short_table(all_rows, stock_rows, main_sets)
    md = "\n".join([f"# Accuracy sweep, {datetime.date.today().isoformat()}", "", report.SWEEP_NOTE, "", *sections,
                    "## The A-B knob: accuracy on repeats by share of layout-a records", "",
                    report.knob_md(knob) if knob["shares"] else "(no data set with layout tags)", "",
                    "## Summary (accuracy on repeats / measured recomputed fraction)", "", table, ""])
    (out / "sweep.md").write_text(md)
    (out / "summary.md").write_text("Accuracy on repeats / measured recomputed fraction (details: sweep.md)\n\n"
                                    + table + "\n")
    data = {"meta": {"sets": {n: s["path"] for n, s in sets.items()}, "image_tokens": image_tokens,
                     "configs": [dataclasses.asdict(c) for c in plan]},
            "summary": all_rows, "stock": stock_rows, "knob": knob}
    (out / "sweep.json").write_text(json.dumps(data, indent=1))
    print(f"\nresults in {out} (sweep.md, <set>/accuracy.md)\n\n{table}")
    return data


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--server", action="append", required=True, metavar="LABEL=URL")
    p.add_argument("--reference", required=True, help="LABEL of the server the others are compared with")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--limit", type=int, help="only the first N records")
    args = p.parse_args(argv)
    try:
        args.targets = [parse_server(s) for s in args.server]
    except ValueError as e:
        p.error(str(e))
    labels = [t.label for t in args.targets]
    if len(set(labels)) != len(labels):
        p.error(f"server labels must be distinct: {labels}")
    if args.reference not in labels:
        p.error(f"--reference {args.reference!r} is not one of the servers {labels}")
    if args.max_tokens < 1 or (args.limit is not None and args.limit < 1):
        p.error("--max-tokens and --limit must be >= 1")
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sweep"]:
        return sweep_main(argv[1:])
    args = parse_args(argv)
    try:
        records = load_dataset(args.dataset, args.limit)
    except ValueError as e:
        raise SystemExit(f"bad dataset: {e}") from None
    print(f"{len(records)} records, {sum(r.repeat for r in records)} repeat occurrences; "
          f"{len(args.targets)} servers in parallel, file order within each", flush=True)
    t0 = time.monotonic()
    with ThreadPoolExecutor(len(args.targets)) as pool:
        runs = list(pool.map(lambda t: run_server(t, records, args.max_tokens), args.targets))
    by_label = {t.label: run for t, run in zip(args.targets, runs)}
    reference = by_label[args.reference][0]
    summary = [summarise(t, results, reference, window) for t, (results, window) in zip(args.targets, runs)]
    meta = {"dataset": str(args.dataset), "date": datetime.date.today().isoformat(), "n": len(records),
            "n_repeat": sum(r.repeat for r in records), "reference": args.reference, "max_tokens": args.max_tokens,
            "servers": {t.label: t.url for t in args.targets}, "elapsed_s": round(time.monotonic() - t0, 1)}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "summary": summary, "requests": [r for run in runs for r in run[0]]}
    (out / "accuracy.json").write_text(json.dumps(data, indent=1))
    (out / "accuracy.md").write_text(report_md(meta, summary))
    plot.try_plot("accuracy", out)
    print(f"\nresults in {out}\n")
    print((out / "accuracy.md").read_text())
    return data


if __name__ == "__main__":
    main()
