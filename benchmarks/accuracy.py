"""Accuracy of servers on an image QA set, sent in file order so recurring images hit the vlcache store.

    python benchmarks/accuracy.py --dataset eval.jsonl --server stock=http://127.0.0.1:30000 \\
        --server full=http://127.0.0.1:30001 --server first_k:16=http://127.0.0.1:30002 \\
        --reference stock --out-dir DIR [--max-tokens 8] [--limit N]

Dataset JSONL, one record per line: {"id", "prompt": "text <image> text", "images": [data URL or file
path (relative to the dataset's folder)], "answer", "system": optional}; each `<image>` in the prompt
is where the next image goes. A server LABEL is `policy` or `policy:param`; the policy is the plot
series. Per server: exact-match accuracy (normalised), the same on repeat occurrences (records all of
whose images came earlier in the file), agreement with the reference server, and the vlcache hit rate
and recomputed fraction over the run. Writes DIR/accuracy.{json,md} (+ accuracy.png with matplotlib).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime
import json
import mimetypes
import string
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
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
    repeat: bool = False  # every image of it appeared in an earlier record

    def messages(self) -> list[dict]:
        """Chat messages: the prompt's text pieces with the images at the markers."""
        content: list[dict] = []
        for i, text in enumerate(self.prompt.split(MARKER)):
            if text:
                content.append({"type": "text", "text": text})
            if i < len(self.images):
                content.append({"type": "image_url", "image_url": {"url": self.images[i]}})
        messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        return messages + [{"role": "user", "content": content}]


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
    markers = obj["prompt"].count(MARKER)
    if markers != len(obj["images"]):
        raise ValueError(f"the prompt has {markers} {MARKER} marker(s) but there are {len(obj['images'])} image(s)")
    images = [image_data_url(ref, base_dir) for ref in obj["images"]]
    return Record(str(obj["id"]), obj["prompt"], images, obj["answer"], obj.get("system"))


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


def ask(target: Target, rec: Record, max_tokens: int) -> dict:
    body = {"model": "default", "messages": rec.messages(), "max_tokens": max_tokens, "temperature": 0}
    t0 = time.perf_counter()
    try:
        text = post_chat(target.url, body)["choices"][0]["message"]["content"] or ""
        error = None
    except (RuntimeError, OSError, KeyError, IndexError, ValueError) as e:
        text, error = "", f"{type(e).__name__}: {e}"
    return {"id": rec.id, "server": target.label, "text": text, "answer": normalise(text),
            "correct": error is None and normalise(text) == normalise(rec.answer), "repeat": rec.repeat,
            "latency_s": round(time.perf_counter() - t0, 4), "error": error}


def run_server(target: Target, records: list[Record], max_tokens: int) -> tuple[list[dict], dict]:
    """All records in file order against one server, and its vlcache gauges over the run."""
    before = fetch_gauges(target.url)
    results = [ask(target, rec, max_tokens) for rec in records]
    return results, launch.gauge_deltas(before, fetch_gauges(target.url))


# ----- summary ----------------------------------------------------------------------------------

def _rate(flags: list[bool]) -> Optional[float]:
    return sum(flags) / len(flags) if flags else None


def summarise(target: Target, results: list[dict], reference: list[dict], window: dict[str, float]) -> dict:
    ref = {r["id"]: r for r in reference}
    agree = [r["error"] is None and ref[r["id"]]["error"] is None and r["answer"] == ref[r["id"]]["answer"]
             for r in results]
    repeats = [r["correct"] for r in results if r["repeat"]]
    return {"server": target.label, "policy": target.policy, "param": target.param, "n": len(results),
            "n_errors": sum(r["error"] is not None for r in results),
            "accuracy": _rate([r["correct"] for r in results]), "n_repeat": len(repeats),
            "repeat_accuracy": _rate(repeats), "agreement": _rate(agree),
            "recomputed_fraction": window.get("recomputed_fraction"),
            "hit_rate": window.get("hit_rate"), "reused_tokens": window.get("reused_tokens"),
            "recomputed_tokens": window.get("recomputed_tokens")}


def _fmt(v: Any, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def table_md(summary: list[dict], reference: str) -> str:
    lines = [f"| server | n | accuracy | accuracy on repeats (n) | agreement with {reference} | "
             "recomputed fraction | hit rate | errors |", "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['server']} | {s['n']} | {_fmt(s['accuracy'], '.3f')} | "
                     f"{_fmt(s['repeat_accuracy'], '.3f')} ({s['n_repeat']}) | {_fmt(s['agreement'], '.3f')} | "
                     f"{_fmt(s['recomputed_fraction'], '.3f')} | {_fmt(s['hit_rate'], '.2f')} | {s['n_errors']} |")
    return "\n".join(lines)


def report_md(meta: dict, summary: list[dict]) -> str:
    return "\n".join([
        f"# Accuracy: {meta['dataset']}, {meta['date']}", "",
        f"{meta['n']} records ({meta['n_repeat']} repeat occurrences: all their images came earlier in the file), "
        f"sent to each server in file order, greedy, max {meta['max_tokens']} tokens. Accuracy: exact match "
        "after strip, lower-case and dropping trailing punctuation. Agreement: same normalised answer as the "
        "reference server. Recomputed fraction and hit rate: vlcache gauges over the run (– for stock, or "
        "when nothing was reused).", "", table_md(summary, meta["reference"]), ""])


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
