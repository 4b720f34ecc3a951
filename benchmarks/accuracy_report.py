"""Tables of `accuracy.py sweep`: per data set (every config, per question kind, per number of reused
images), the exactness row (stock vs full), the A-B knob, and the short table the run prints last.
Rows are accuracy.summarise_config dicts; nothing here talks to a server."""

from __future__ import annotations

from typing import Any, Optional


def fmt(v: Any, spec: str) -> str:
    """A table cell: the value in `spec`, or a dash for a missing one."""
    return "–" if v is None else format(v, spec)


def sweep_table_md(rows: list[dict]) -> str:
    lines = ["| config | accuracy on repeats (n) | agreement with full | KL vs full (mean / max) | "
             "recomputed fraction (asked / measured) | hit rate | errors |", "|---|---|---|---|---|---|---|"]
    for s in rows:
        if s.get("skipped"):
            asked = fmt(s["fraction"], ".2f")
            lines.append(f"| {s['config']} | – | – | – | {asked} / – | – | {s['error']} |")
            continue
        kl = "–" if s["kl_mean"] is None else f"{s['kl_mean']:.4f} / {s['kl_max']:.3f}"
        err = f"{s['n_errors']}" + (f" ({s['error'][:60]})".replace("|", "/") if s["n_errors"] else "")
        lines.append(f"| {s['config']} | {fmt(s['repeat_accuracy'], '.3f')} ({s['n_repeat']}) | "
                     f"{fmt(s['agreement'], '.3f')} | {kl} | {fmt(s['fraction'], '.2f')} / "
                     f"{fmt(s['recomputed_fraction'], '.3f')} | {fmt(s['hit_rate'], '.2f')} | {err} |")
    return "\n".join(lines)


def exactness_md(stock: Optional[dict]) -> str:
    if stock is None:
        return "Stock server: not run."
    if stock.get("skipped") or stock["agreement"] is None:
        return f"Stock vs `full`: not measured ({stock.get('error')})."
    kl = "–" if stock["kl_mean"] is None else f"mean {stock['kl_mean']:.2e}, max {stock['kl_max']:.2e}"
    return (f"Exactness: stock SGLang vs vlcache `full`, same answer on {stock['agreement']:.3f} of "
            f"{stock['agreement_n']} records (all occurrences); first-token KL {kl}; stock accuracy "
            f"{fmt(stock['accuracy'], '.3f')}, on repeats {fmt(stock['repeat_accuracy'], '.3f')}.")


def group_table(rows: list[dict], requests: list[dict], key, title: str) -> str:
    """Accuracy on repeats per config and group (key(request) -> group name, None: left out)."""
    cells: dict[str, dict[str, list[bool]]] = {}
    for r in requests:
        g = key(r)
        if g is not None:
            cells.setdefault(r["server"], {}).setdefault(g, []).append(r["correct"])
    groups = sorted({g for v in cells.values() for g in v})
    lines = ["| config | " + " | ".join(f"{title} {g}".strip() for g in groups) + " |", "|---|" + "---|" * len(groups)]
    for s in rows:
        row = cells.get(s["config"], {})
        lines.append(f"| {s['config']} | " + " | ".join(
            f"{sum(row[g]) / len(row[g]):.3f} ({len(row[g])})" if row.get(g) else "–" for g in groups) + " |")
    return "\n".join(lines)


def kind_of(r: dict) -> Optional[str]:
    """A repeat's question kind (its tag, else the id's last part); None for first occurrences."""
    if r.get("n_reused", 0) <= 0:
        return None
    return r.get("kind") or r["id"].rsplit("-", 1)[-1]


def dataset_md(name: str, meta: dict, rows: list[dict], stock: Optional[dict], requests: list[dict]) -> str:
    parts = [f"## {name}: {meta['path']}", "",
             f"{meta['n']} records, {meta['n_repeat']} with a reused image (repeats), {meta['waves']} waves; "
             f"image tokens {meta['image_tokens']}; A-share {fmt(meta['a_share'], '.2f')}; hit rate if every "
             f"image is stored at its first occurrence {meta['expected_hit_rate']:.2f} (lower measured: the server "
             "declined to store some, e.g. second-generation KV after a reused image).", "",
             exactness_md(stock), "", sweep_table_md(rows), ""]
    unflushed = [s["config"] for s in rows if s.get("first_wave_hits")]
    if unflushed:
        parts += [f"**Warning**: first occurrences hit the store after `POST /flush_cache` under {unflushed}: "
                  "the flush did not empty it, and those passes reused images across configs.", ""]
    parts += ["Accuracy on repeats by question kind:", "", group_table(rows, requests, kind_of, ""), ""]
    if any(r.get("n_reused", 0) > 1 for r in requests):
        parts += ["Accuracy by the number of reused images in the request (multi-image):", "",
                  group_table(rows, requests, lambda r: str(r.get("n_reused", 0)), "reused"), ""]
    return "\n".join(parts)


def knob_md(knob: dict) -> str:
    shares = knob["shares"]
    lines = ["| config | " + " | ".join(f"A-share {s:.2f} ({n})" for n, s in shares) + " |",
             "|---|" + "---|" * len(shares)]
    for label, values in knob["rows"].items():
        lines.append(f"| {label} | " + " | ".join(fmt(values.get(n), ".3f") for n, _ in shares) + " |")
    return "\n".join(lines)


def short_table(all_rows: dict[str, list[dict]], stock: dict[str, Optional[dict]], main_sets: list[str]) -> str:
    """The run's last lines: accuracy on repeats and measured recomputed fraction of the key configs."""
    # full, none, every bounded policy (no asked fraction: its bound decides) and the 5 % configs.
    keep = lambda s: s["policy"] in ("full", "none") or s["fraction"] in (None, 0.05)  # noqa: E731
    labels = list(dict.fromkeys(s["config"] for n in main_sets for s in all_rows.get(n, []) if keep(s)))
    lines = ["| config | " + " | ".join(f"{n}: acc rep / frac" for n in main_sets) + " |",
             "|---|" + "---|" * len(main_sets)]
    st = [stock.get(n) for n in main_sets]
    lines.append("| stock (= full?) | " + " | ".join(
        "–" if s is None or s.get("repeat_accuracy") is None else
        f"{s['repeat_accuracy']:.3f} / agree {fmt(s['agreement'], '.3f')}" for s in st) + " |")
    for label in labels:
        cells = []
        for n in main_sets:
            s = next((x for x in all_rows.get(n, []) if x["config"] == label), None)
            cells.append("–" if s is None or s.get("repeat_accuracy") is None else
                         f"{s['repeat_accuracy']:.3f} / {fmt(s['recomputed_fraction'], '.3f')}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def knob_data(sets: dict, all_rows: dict[str, list[dict]]) -> dict:
    """Accuracy on repeats per config along the share of layout-a records (sets with layout tags)."""
    tagged = sorted(((n, s["a_share"]) for n, s in sets.items() if s["a_share"] is not None), key=lambda x: x[1])
    knob_sets = [n for n, s in sets.items() if s["knob"]]
    if not knob_sets:
        return {"shares": [], "rows": {}}
    labels = [s["config"] for s in all_rows.get(knob_sets[0], []) if not s.get("skipped")]
    rows = {label: {n: next((s["repeat_accuracy"] for s in all_rows.get(n, []) if s["config"] == label), None)
                    for n, _ in tagged} for label in labels}
    return {"shares": tagged, "rows": rows}


SWEEP_NOTE = (
    "One vlcache server; each config is a per-request override (`custom_params.vlcache`) over the whole "
    "data set after `POST /flush_cache`, first occurrences before the repeats that reuse them, greedy. "
    "Repeats: records with at least one image seen earlier. Agreement and KL: against the `full` pass "
    "on the same records. KL: KL(full || config) of the first generated token, from each pass's top-20 "
    "logprobs, coarse-grained to full's top 20 plus one bucket for the rest, a token missing from the "
    "config's top 20 taking the config's 20th probability: a lower-bound estimate (`first_token_kl`). "
    "Recomputed fraction (measured) and hit rate: the server's vlcache gauges over the pass; 'asked' is "
    "the config's fraction (first_k: k = round(fraction x image tokens); error_bounded: its bound decides, "
    "its floor is the recompute_ratio).")
