"""accuracy.py sweep without a GPU: config planning, the override body, waves, first-token KL, and a
whole sweep against a fake vlcache server (flush, gauges, 400 for a bad override, time budget)."""

import base64
import io
import json
import math
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import accuracy  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fake_sglang  # noqa: E402


def _url(name: str) -> str:
    return "data:image/png;base64," + base64.b64encode(name.encode()).decode()


def _rec(id_, images, answer="x", **kw):
    return accuracy.Record(id_, "Q " + "".join(["<image>"] * len(images)), images, answer, **kw)


def test_plan_covers_every_policy_and_fraction_in_run_order():
    plan = accuracy.plan_configs(accuracy.FRACTIONS, 64, (0.05, 0.1), 0.02)
    labels = [c.label for c in plan]
    assert labels[:2] == ["full", "none"]
    # first_k: k = round(f x 64); 0 (= none) dropped, 1 % and 2 % both give k = 1: measured once.
    assert sorted(int(c.param) for c in plan if c.policy == "first_k") == [1, 3, 6, 13, 32]
    for policy in ("vlcache", "cacheblend"):
        assert sorted(c.fraction for c in plan if c.policy == policy) == sorted(accuracy.FRACTIONS)
    assert len(labels) == len(set(labels)) == 2 + 5 + 7 + 7 + 2
    # The 5 % budget of every policy (and the first bound) right after full and none.
    assert {c.label for c in plan[2:6]} == {"first_k:3", "vlcache:0.05", "cacheblend:0.05", "error_bounded:0.05"}
    assert [c.tier for c in plan] == sorted(c.tier for c in plan)
    by = {c.label: c for c in plan}
    assert by["first_k:3"].override == {"policy": "first_k", "first_k": 3}
    assert by["cacheblend:0.2"].override == {"policy": "cacheblend", "recompute_ratio": 0.2}
    assert by["error_bounded:0.1"].override == {"policy": "error_bounded", "error_bound": 0.1, "recompute_ratio": 0.02,
                                             "check_sample": 1.0}
    assert by["full"].override == {"policy": "full"} and by["none"].override == {"policy": "none"}


def test_plan_rejects_bad_values_and_the_knob_subset():
    with pytest.raises(ValueError, match="fractions"):
        accuracy.plan_configs((0.05, 1.5), 64)
    with pytest.raises(ValueError, match="unknown policies"):
        accuracy.plan_configs((0.05,), 64, policies=("magic",))
    with pytest.raises(ValueError, match="unknown policies"):
        accuracy.plan_configs((0.05,), 64, (0.1,), bounded_policies=("full",))
    plan = accuracy.plan_configs((0.0, 0.05, 0.2), 16, (0.1, 0.3))
    assert [c.label for c in plan if c.policy == "first_k"] == ["first_k:1", "first_k:3"]  # 16 tokens
    knob = accuracy.knob_subset(plan, [0.05])
    assert [c.label for c in knob] == ["full", "none", "first_k:1", "vlcache:0.05", "cacheblend:0.05",
                                       "error_bounded:0.1"]
    both = accuracy.plan_configs((0.05,), 16, (0.1, 0.3), bounded_policies=("error_bounded", "image_bounded"))
    by = {c.label: c for c in both}
    assert by["image_bounded:0.3"].override == {"policy": "image_bounded", "error_bound": 0.3, "recompute_ratio": 0.02,
                                               "check_sample": 1.0}
    assert [c.label for c in accuracy.knob_subset(both, [0.05]) if c.fraction is None] == \
        ["error_bounded:0.1", "image_bounded:0.1"], "the knob runs every bounded policy at the first bound"
    probed = accuracy.plan_configs((0.05,), 16, (0.1,), bounded_policies=("image_bounded",), check_samples=(1.0, 0.25))
    by = {c.label: c for c in probed if c.family == "image_bounded"}
    assert list(by) == ["image_bounded:0.1", "image_bounded/s0.25:0.1"], "a probe is a config (and a plot line) of its own"
    assert by["image_bounded/s0.25:0.1"].override["check_sample"] == 0.25
    assert by["image_bounded:0.1"].override["check_sample"] == 1.0, "a plain check says so: the server probes"
    with pytest.raises(ValueError, match="must be in"):
        accuracy.plan_configs((0.05,), 16, (0.1,), check_samples=(0.0,))


def test_override_body_and_stock_body():
    rec = _rec("1", [_url("RED")], system="sys", history=[{"role": "user", "content": "hi"},
                                                           {"role": "assistant", "content": "hello"}])
    body = accuracy.chat_body(rec, 4, {"policy": "cacheblend", "recompute_ratio": 0.05}, top_logprobs=20)
    assert body["custom_params"] == {"vlcache": {"policy": "cacheblend", "recompute_ratio": 0.05}}
    assert body["logprobs"] is True and body["top_logprobs"] == 20 and body["max_tokens"] == 4
    assert body["temperature"] == 0
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    json.dumps(body)  # serialisable as is
    stock = accuracy.chat_body(rec, 4, None, top_logprobs=20)
    assert "custom_params" not in stock and "logprobs" in stock
    assert "logprobs" not in accuracy.chat_body(rec, 4)


def test_history_in_records_is_validated(tmp_path):
    ok = {"id": "a", "prompt": "<image>Q", "images": [_url("RED")], "answer": "r",
          "history": [{"role": "user", "content": "My favourite colour is red."}], "kind": "b.ref", "layout": "b"}
    rec = accuracy.parse_record(ok, tmp_path)
    assert rec.history == ok["history"] and rec.kind == "b.ref" and rec.layout == "b"
    for bad in ([{"role": "system", "content": "x"}], [{"role": "user"}], "text", [{"role": "user", "content": 3}]):
        with pytest.raises(ValueError, match="history must be"):
            accuracy.parse_record({**ok, "history": bad}, tmp_path)


def test_waves_put_first_occurrences_before_the_repeats_that_reuse_them():
    r, b, g, y = (_url(c) for c in ("R", "B", "G", "Y"))
    recs = [_rec("1", [r]), _rec("2", [b]), _rec("3", [r]), _rec("4", [b]), _rec("5", [r])]
    assert [[x.id for x in w] for w in accuracy.phases(recs)] == [["1", "2"], ["3", "4", "5"]]
    # Multi-image: a request with a new image and one of wave 1's new images comes after wave 1.
    recs = [_rec("1", [r, b]), _rec("2", [g, r]), _rec("3", [y, g]), _rec("4", [b, y, _url("N")])]
    assert [[x.id for x in w] for w in accuracy.phases(recs)] == [["1"], ["2"], ["3"], ["4"]]


def test_kl_is_zero_for_equal_lists_and_matches_the_coarse_grained_formula():
    ref = [("3", math.log(0.7)), ("4", math.log(0.2)), ("2", math.log(0.05))]
    assert accuracy.first_token_kl(ref, ref) == pytest.approx(0.0, abs=1e-12)
    other = [("4", math.log(0.6)), ("3", math.log(0.3)), ("2", math.log(0.05))]
    # Buckets {3, 4, 2, rest}: p = (.7, .2, .05, .05), q = (.3, .6, .05, .05).
    expected = 0.7 * math.log(0.7 / 0.3) + 0.2 * math.log(0.2 / 0.6)
    assert accuracy.first_token_kl(ref, other) == pytest.approx(expected)
    # "2" missing from other's list: it takes other's smallest listed probability (0.3).
    missing = [("4", math.log(0.6)), ("3", math.log(0.3))]
    q = {"3": 0.3, "4": 0.6, "2": 0.3}
    scale = 1 / 1.2  # the floors overcount: q is rescaled to a distribution, nothing left for the rest
    expected = sum(p * math.log(p / (q[t] * scale)) for t, p in (("3", .7), ("4", .2), ("2", .05)))
    expected += 0.05 * math.log(0.05 / 1e-9)
    assert accuracy.first_token_kl(ref, missing) == pytest.approx(expected, rel=1e-6)
    assert accuracy.first_token_kl(None, ref) is None and accuracy.first_token_kl(ref, []) is None


def test_kl_is_never_negative_on_random_lists():
    import random

    rnd = random.Random(0)
    for _ in range(200):
        toks = [str(i) for i in range(30)]
        a = rnd.sample(toks, 20)
        b = rnd.sample(toks, 20)
        pa = [rnd.random() for _ in a]
        pb = [rnd.random() for _ in b]
        ref = [(t, math.log(v / sum(pa) * 0.95)) for t, v in zip(a, pa)]
        oth = [(t, math.log(v / sum(pb) * 0.9)) for t, v in zip(b, pb)]
        assert accuracy.first_token_kl(ref, oth) >= 0.0


def test_top_logprobs_of_a_response():
    resp = {"choices": [{"message": {"content": "3"}, "logprobs": {"content": [
        {"token": "3", "logprob": -0.1, "top_logprobs": [{"token": "3", "logprob": -0.1}, {"token": "4", "logprob": -2.4}]},
        {"token": "<|im_end|>", "logprob": 0.0, "top_logprobs": []}]}}]}
    assert accuracy.first_top_logprobs(resp) == [("3", -0.1), ("4", -2.4)]
    assert accuracy.first_top_logprobs({"choices": [{"message": {"content": "x"}}]}) is None


def test_image_tokens_from_the_png_header():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (224, 112)).save(buf, format="PNG")
    assert accuracy.image_tokens_of("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()) == 8 * 4
    with pytest.raises(ValueError, match="--image-tokens"):
        accuracy.image_tokens_of(_url("not a png at all, just text....................."))


# ----- a whole sweep against a fake vlcache server ---------------------------------------------

N_TOKENS = 16


class FakeVlcache(fake_sglang.JsonHandler):
    """Answers the image's name (its base64 payload) unless a reused image is read under a policy that
    recomputes less than 5 %; keeps vlcache gauges; 400 for error_bounded with a bound above 1."""

    store: set = set()
    gauges: dict = {}
    pending: dict = {}
    lock = threading.Lock()
    flushes = 0
    stock = False
    die_on: dict = {}  # an override that "crashes" the server (500s and a failing /health until restarted)
    dead = False
    hang_on: dict = {}  # an override under which every request takes 1 s

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/flush_cache":
            with self.lock:
                type(self).store = set()
                type(self).flushes += 1
            return self._send(200, "Cache flushed.", "text/plain")
        body = json.loads(raw)
        override = body.get("custom_params", {}).get("vlcache", {})
        if self.die_on and override == self.die_on:
            type(self).dead = True
        if self.hang_on and override == self.hang_on:
            import time
            time.sleep(1.0)
        if self.dead:
            return self._send(500, "scheduler died")
        if self.stock:
            assert not override
        if override.get("error_bound", 0) > 1:
            return self._send(400, json.dumps({"error": "error_bound must be <= 1"}))
        with self.lock:  # like the server: a batch's per-layer counts are exported when the next one is planned
            for k, v in self.pending.items():
                self.gauges[k] = self.gauges.get(k, 0) + v
            self.pending.clear()
        content = body["messages"][-1]["content"]
        if isinstance(content, str):  # text only (accuracy.nudge_gauges)
            return self._send(200, json.dumps({"choices": [{"message": {"content": "hi"}}]}))
        images = [c["image_url"]["url"] for c in content if c["type"] == "image_url"]
        policy = override.get("policy", "full")
        frac = {"full": 1.0, "none": 0.0}.get(policy, override.get("recompute_ratio", override.get("first_k", 0) / N_TOKENS))
        wrong = False
        with self.lock:
            g = type(self).gauges
            for u in images:
                if u in self.store and not self.stock:
                    g["key_hits"] = g.get("key_hits", 0) + 1
                    g["reused_tokens"] = g.get("reused_tokens", 0) + N_TOKENS
                    g["recomputed_tokens"] = g.get("recomputed_tokens", 0) + round(frac * N_TOKENS)
                    # Per layer (4 layers), what the fraction is computed from; exported one request late.
                    pending = self.pending
                    pending["reused_token_layers"] = pending.get("reused_token_layers", 0) + 4 * N_TOKENS
                    pending["recomputed_token_layers"] = (pending.get("recomputed_token_layers", 0)
                                                          + 4 * round(frac * N_TOKENS))
                    wrong |= frac < 0.05
                else:
                    g["key_misses"] = g.get("key_misses", 0) + 1
                    self.store.add(u)
        name = base64.b64decode(images[0].split(",", 1)[1]).decode().lower()
        answer = "wrong" if wrong else name
        top = [{"token": answer, "logprob": -0.05}, {"token": "other", "logprob": -3.0}]
        self._send(200, json.dumps({"choices": [{"message": {"content": answer},
                                                 "logprobs": {"content": [{"token": answer, "logprob": -0.05,
                                                                           "top_logprobs": top}]}}]}))

    def do_GET(self):
        if self.path == "/health":
            return self._send(503 if self.dead else 200, "", "text/plain")
        with self.lock:
            text = "".join(f"sglang:vlcache_{k} {float(v)}\n" for k, v in self.gauges.items())
        self._send(200, text, "text/plain")



def _serve(handler):
    return fake_sglang.serve(handler)


def _dataset(path, names, repeats, layout="a"):
    rows = []
    for occ in range(repeats):
        for n in names:
            rows.append({"id": f"{n}-{occ}-count", "prompt": f"Q{occ} <image>Answer:", "images": [_url(n)],
                         "answer": n.lower(), "kind": "count", "layout": layout})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sweep_against_a_fake_server(tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy.plot, "try_plot", lambda kind, out: None)
    vl = type("VL", (FakeVlcache,), {"store": set(), "gauges": {}, "pending": {}, "lock": threading.Lock()})
    st = type("ST", (FakeVlcache,), {"store": set(), "gauges": {}, "pending": {}, "lock": threading.Lock(), "stock": True})
    (srv_v, url_v), (srv_s, url_s) = _serve(vl), _serve(st)
    a = _dataset(tmp_path / "A.jsonl", ["RED", "BLUE", "GREEN"], 3, "a")
    mu = _dataset(tmp_path / "multi.jsonl", ["PINK"], 2, "multi")  # no place on the A-B knob
    b = _dataset(tmp_path / "B.jsonl", ["PINK", "GREY"], 2, "b")
    m = _dataset(tmp_path / "mix.jsonl", ["RED", "BLUE"], 2, "a")
    try:
        data = accuracy.main(["sweep", "--dataset", f"A={a}", "--dataset", f"B={b}", "--dataset", f"multi={mu}",
                              "--knob-dataset", f"mix-0.5={m}",
                              "--vlcache", url_v, "--stock", url_s, "--out-dir", str(tmp_path / "out"),
                              "--fractions", "0,5,50", "--error-bounds", "0.5,2", "--knob-fractions", "5",
                              "--image-tokens", str(N_TOKENS), "--concurrency", "4",
                              "--progress", str(tmp_path / "progress.log")])
    finally:
        srv_v.shutdown()
        srv_s.shutdown()
    rows = {s["config"]: s for s in data["summary"]["A"]}
    assert set(rows) == {"full", "none", "first_k:1", "first_k:8", "vlcache:0", "vlcache:0.05", "vlcache:0.5",
                         "cacheblend:0", "cacheblend:0.05", "cacheblend:0.5", "error_bounded:0.5", "error_bounded:2"}
    assert rows["full"]["repeat_accuracy"] == 1.0 and rows["full"]["agreement"] == 1.0 and rows["full"]["kl_mean"] == pytest.approx(0, abs=1e-12)
    assert rows["none"]["repeat_accuracy"] == 0.0 and rows["none"]["agreement"] == 0.0 and rows["none"]["n_repeat"] == 6
    assert rows["none"]["kl_mean"] > 1.0 and rows["none"]["accuracy"] == pytest.approx(1 / 3)
    assert rows["vlcache:0.5"]["recomputed_fraction"] == 0.5 and rows["vlcache:0.5"]["hit_rate"] == pytest.approx(2 / 3)
    assert rows["first_k:1"]["recomputed_fraction"] == pytest.approx(1 / 16)
    # Each pass starts from an empty store: first occurrences miss.
    assert all(s["first_wave_hits"] == 0 for s in rows.values() if not s.get("n_errors"))
    # A bad override is a 400 for every request: recorded, and the sweep went on.
    assert rows["error_bounded:2"]["n_errors"] == 9 and "HTTP 400" in rows["error_bounded:2"]["error"]
    assert rows["error_bounded:2"]["accuracy"] is None and rows["error_bounded:0.5"]["n_errors"] == 0
    stock = data["stock"]["A"]
    assert stock["agreement"] == 1.0 and stock["agreement_n"] == 9 and stock["kl_max"] == pytest.approx(0, abs=1e-12)
    # The knob set ran its subset only; the knob runs over the layout shares of all three sets.
    assert {s["config"] for s in data["summary"]["mix-0.5"]} == {"full", "none", "first_k:1", "vlcache:0.05",
                                                                 "cacheblend:0.05", "error_bounded:0.5"}
    assert [tuple(x) for x in data["knob"]["shares"]] == [("B", 0.0), ("A", 1.0), ("mix-0.5", 1.0)]  # not multi
    out = tmp_path / "out"
    md = (out / "sweep.md").read_text()
    assert "| none | 0.000 (6) | 0.000 |" in md and "Exactness: stock SGLang vs vlcache `full`" in md
    assert md.rstrip().splitlines()[-1].startswith("| error_bounded:2 |")
    table = [l.split(" |")[0][2:] for l in (out / "A" / "accuracy.md").read_text().splitlines() if l.startswith("| ")]
    assert table[1:13] == ["full", "none", "first_k:1", "first_k:8", "vlcache:0", "vlcache:0.05", "vlcache:0.5",
                           "cacheblend:0", "cacheblend:0.05", "cacheblend:0.5", "error_bounded:0.5", "error_bounded:2"]
    saved = json.loads((out / "A" / "accuracy.json").read_text())
    assert saved["meta"]["plot_y"] == "repeat_accuracy" and all("top" not in r for r in saved["requests"])
    assert "A full:" in (tmp_path / "progress.log").read_text()


def test_sweep_past_the_deadline_reports_skipped_passes(tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy.plot, "try_plot", lambda kind, out: None)
    vl = type("VL2", (FakeVlcache,), {"store": set(), "gauges": {}, "pending": {}, "lock": threading.Lock()})
    srv, url = _serve(vl)
    a = _dataset(tmp_path / "A.jsonl", ["RED"], 2)
    try:
        data = accuracy.main(["sweep", "--dataset", f"A={a}", "--vlcache", url, "--out-dir", str(tmp_path / "o"),
                              "--fractions", "5", "--error-bounds", "", "--image-tokens", "16", "--deadline-unix", "1"])
    finally:
        srv.shutdown()
    assert all(s.get("skipped") and s["error"] == "skipped: time budget" for s in data["summary"]["A"])
    assert "skipped: time budget" in (tmp_path / "o" / "A" / "accuracy.md").read_text()


def test_report_tables_on_canned_rows():
    import accuracy_report as report

    def row(config, policy, fraction, acc, frac, **kw):
        return {"config": config, "policy": policy, "fraction": fraction, "repeat_accuracy": acc,
                "recomputed_fraction": frac, "n_repeat": 10, "agreement": acc, "kl_mean": 0.1, "kl_max": 0.5,
                "hit_rate": 0.8, "n_errors": 0, "error": None, **kw}

    rows = {"A": [row("full", "full", 1.0, 0.9, 1.0), row("none", "none", 0.0, 0.3, 0.0),
                  row("vlcache:0.05", "vlcache", 0.05, 0.8, 0.06), row("vlcache:0.2", "vlcache", 0.2, 0.85, 0.2),
                  row("error_bounded:0.1", "error_bounded", None, 0.88, 0.31)],
            "multi": [row("full", "full", 1.0, 0.7, 1.0)]}
    stock = {"A": {"repeat_accuracy": 0.9, "agreement": 1.0}, "multi": None}
    lines = report.short_table(rows, stock, ["A", "multi"]).splitlines()
    assert lines[2] == "| stock (= full?) | 0.900 / agree 1.000 | – |"
    assert [l.split(" |")[0][2:] for l in lines[3:]] == ["full", "none", "vlcache:0.05", "error_bounded:0.1"]
    assert lines[-1] == "| error_bounded:0.1 | 0.880 / 0.310 | – |"
    reqs = [{"server": "full", "n_reused": n, "correct": c, "id": f"m{i}-multi.total", "kind": "multi.total"}
            for i, (n, c) in enumerate([(0, True), (1, True), (2, False), (2, True)])]
    by_reused = report.group_table(rows["multi"], reqs, lambda r: str(r["n_reused"]), "reused").splitlines()
    assert by_reused[0] == "| config | reused 0 | reused 1 | reused 2 |"
    assert by_reused[2] == "| full | 1.000 (1) | 1.000 (1) | 0.500 (2) |"
    by_kind = report.group_table(rows["multi"], reqs, report.kind_of, "").splitlines()
    assert by_kind[0] == "| config | multi.total |" and by_kind[2] == "| full | 0.667 (3) |"  # repeats only
    knob = {"shares": [("B", 0.0), ("mix-0.5", 0.5), ("A", 1.0)], "rows": {"none": {"B": 0.8, "A": 0.3}}}
    assert report.knob_md(knob).splitlines()[2] == "| none | 0.800 | – | 0.300 |"
    assert "not run" in report.exactness_md(None)


@pytest.mark.parametrize("can_restart", [True, False])
def test_a_server_crash_is_recorded_and_the_server_restarted(tmp_path, monkeypatch, can_restart):
    monkeypatch.setattr(accuracy.plot, "try_plot", lambda kind, out: None)
    vl = type("VL3", (FakeVlcache,), {"store": set(), "gauges": {}, "pending": {}, "lock": threading.Lock(), "dead": False,
                                      "die_on": {"policy": "vlcache", "recompute_ratio": 0.05}})
    srv, url = _serve(vl)
    a = _dataset(tmp_path / "A.jsonl", ["RED", "BLUE"], 2)
    restarts = []

    def restart():
        restarts.append(1)
        vl.dead, vl.die_on = False, {}

    try:
        data = accuracy.sweep_main(["--dataset", f"A={a}", "--vlcache", url, "--out-dir", str(tmp_path / "o"),
                                    "--fractions", "5,20", "--error-bounds", "", "--image-tokens", "16",
                                    "--policies", "vlcache"], restart=restart if can_restart else None)
    finally:
        srv.shutdown()
    rows = {s["config"]: s for s in data["summary"]["A"]}
    assert rows["vlcache:0.05"]["n_errors"] == 4 and "went down during this pass" in rows["vlcache:0.05"]["error"]
    if can_restart:
        assert restarts == [1] and rows["vlcache:0.2"]["repeat_accuracy"] == 1.0
    else:
        assert rows["vlcache:0.2"].get("skipped") and "server down after A vlcache:0.05" in rows["vlcache:0.2"]["error"]


def test_a_request_timeout_cuts_the_pass_short(tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy.plot, "try_plot", lambda kind, out: None)
    vl = type("VL4", (FakeVlcache,), {"store": set(), "gauges": {}, "pending": {}, "lock": threading.Lock(),
                                      "hang_on": {"policy": "none"}})
    srv, url = _serve(vl)
    a = _dataset(tmp_path / "A.jsonl", ["RED", "BLUE", "GREEN", "PINK"], 4)
    try:
        data = accuracy.sweep_main(["--dataset", f"A={a}", "--vlcache", url, "--out-dir", str(tmp_path / "o"),
                                    "--fractions", "5", "--error-bounds", "", "--image-tokens", "16",
                                    "--policies", "vlcache", "--timeout-s", "0.3", "--concurrency", "2"])
    finally:
        srv.shutdown()
    rows = {s["config"]: s for s in data["summary"]["A"]}
    assert rows["none"]["n_errors"] == 16 and rows["none"]["elapsed_s"] < 3  # not 16 timeouts in a row
    saved = json.loads((tmp_path / "o" / "A" / "accuracy.json").read_text())
    errors = [r["error"] for r in saved["requests"] if r["server"] == "none"]
    assert sum("timed out" in e for e in errors) <= 2 and sum(e.startswith("not sent") for e in errors) >= 14
    assert rows["vlcache:0.05"]["n_errors"] == 0 and rows["full"]["repeat_accuracy"] == 1.0
