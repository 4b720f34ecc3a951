"""benchmarks/soak.py without a GPU: stream planning, the answer comparison, verdicts and the table, a
client that goes away (launch.post_and_disconnect), the leak grep, and dry runs against fake SGLang
servers (tests/benchmarks/fake_sglang.py): one that behaves, one with each fault the soak must catch,
and the launcher path with the fakes as server processes."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402
import fake_sglang  # noqa: E402
import images  # noqa: E402
import launch  # noqa: E402
import soak  # noqa: E402


def _dataset(tmp_path, n_images=4, repeats=3):
    """A, B (single image, each asked `repeats` times after other text) and multi (two images)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    urls = [images.bytes_data_url(images.image_bytes(56, 56, seed=100 + i)) for i in range(n_images)]
    for name in ("A", "B"):
        rows = [{"id": f"{i}-{occ}", "prompt": f"Question {occ} about {name}: <image>Answer:", "images": [u],
                 "answer": "3"} for occ in range(repeats) for i, u in enumerate(urls)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = [{"id": f"m{i}", "prompt": "How many? <image><image>Answer:", "images": [urls[i], urls[(i + 1) % n_images]],
             "answer": "5"} for i in range(n_images)]
    (tmp_path / "multi.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return soak.load_records(str(_dataset(tmp_path_factory.mktemp("data"))), "A,B,multi")


@pytest.fixture(scope="module")
def catalogue():
    twin = images.bytes_data_url(images.image_bytes(56, 56, seed=100))
    return soak.hostile_catalogue(twin, "/tmp/vlcache-soak-test-large.png")


def test_the_junk_images_are_fixed_and_unidentifiable(catalogue):
    """Random junk after a PNG signature sometimes reads as a truncated PNG (another message): the
    catalogue's junk is fixed bytes that PIL cannot identify, the same in every run."""
    import base64
    import io

    from PIL import Image, UnidentifiedImageError

    again = {h.name: h.image for h in soak.hostile_catalogue(images.bytes_data_url(images.image_bytes(56, 56, seed=100)),
                                                             "/tmp/vlcache-soak-test-large.png")}
    for h in catalogue:
        if h.name in ("corrupt_png", "corrupt_jpeg_soi_eoi"):
            assert h.image == again[h.name]
            with pytest.raises(UnidentifiedImageError, match="cannot identify image file"):
                Image.open(io.BytesIO(base64.b64decode(h.image.split(",", 1)[1])))


# ----- planning ---------------------------------------------------------------------------------

def test_a_round_starts_cold_and_holds_every_kind_spread_through_the_records(records, catalogue):
    steps = soak.plan_round(3, records, catalogue, soak.odd_valid_images(), 6, seed=1)
    ids = [s.id for s in steps]
    assert len(ids) == len(set(ids)) and all(i.startswith("r3-") for i in ids)
    assert steps[0].kind == "flush_idle", "every round starts from an idle flush"
    assert [s.name for s in steps[1:3]] == ["junk_base64:before", "non_ascii_base64:before"]
    assert [s.name for s in steps[-2:]] == ["junk_base64:after", "non_ascii_base64:after"]
    assert all(s.after == "r3-twin" for s in steps[-2:])
    assert [s.barrier for s in steps[:4]] == [True, True, True, False], "the 'before' twins run alone"
    assert all(s.body.get("top_logprobs") == soak.TOP_LOGPROBS for s in steps if s.compare)
    twin = next(s for s in steps if s.id == "r3-twin")
    salt = twin.body.get("cache_salt")
    assert twin.compare and all(s.body.get("cache_salt") == salt for s in steps[-2:] + steps[1:3])
    kinds = {s.kind for s in steps}
    assert kinds == {"flush_idle", "flush_load", "ok", "hostile", "abort"}
    hostile = {s.name.split(":")[0] for s in steps if s.kind == "hostile"}
    assert hostile == {h.name for h in catalogue}
    assert sum(s.compare for s in steps) == len(records) + 1 + 3, "every record, the twin, the odd images"
    assert {s.body.get("cache_salt") for s in steps if s.body} <= set(soak.SALTS)
    assert any(s.body.get("n") == 2 for s in steps if s.compare) or len(records) < 10
    n2 = [s for s in steps if s.compare and s.body.get("n") == 2]
    assert all(_image_count(s.body) == 1 for s in n2), "SGLang itself refuses n > 1 with several images"
    # The extras land among the records, not in a block at the end.
    positions = [i for i, s in enumerate(steps) if s.kind in ("hostile", "abort", "flush_load")][2:-2]
    assert positions[0] < len(steps) // 3 and positions[-1] > len(steps) // 2
    aborts = [s for s in steps if s.kind == "abort"]
    assert {a.abort["stream"] for a in aborts} == {True, False} and any(a.abort.get("half_body") for a in aborts)
    assert all(a.body["ignore_eos"] and a.body["max_tokens"] >= 128 for a in aborts)
    flushes = [s for s in steps if s.kind == "flush_load"]
    assert len(flushes) == 2 and all(set(s.expect) == {200, 400} for s in flushes)


def _image_count(body: dict) -> int:
    return sum(c["type"] == "image_url" for m in body["messages"] if isinstance(m["content"], list)
               for c in m["content"])


def test_hostile_bodies_carry_the_bad_image_or_override_and_stock_never_sees_overrides(records, catalogue):
    steps = soak.plan_round(0, records, catalogue, [], 6, seed=0)
    by = {s.name: s for s in steps if s.kind == "hostile"}
    urls = lambda s: [c["image_url"]["url"] for m in s.body["messages"] if isinstance(m["content"], list)  # noqa: E731
                      for c in m["content"] if c["type"] == "image_url"]
    assert urls(by["proc_kmsg_abs"])[-1] == "/proc/kmsg"
    assert len(urls(by["bad_second_image"])) == 2 and urls(by["bad_second_image"])[0].startswith("data:image/png")
    assert by["bad_override_policy"].body["custom_params"] == {"vlcache": {"policy": "magic"}}
    assert "custom_params" not in soak.stock_body(by["bad_override_policy"].body)
    assert all(not s.compare for s in by.values())
    assert {s.kind for s in soak.stock_steps(steps)} == {"ok", "flush_idle"}


def test_rounds_differ_by_salt_and_the_plan_is_reproducible(records, catalogue):
    a = soak.plan_round(0, records, catalogue, [], 6, seed=5)
    b = soak.plan_round(1, records, catalogue, [], 6, seed=5)
    salts = lambda steps: [s.body.get("cache_salt") for s in steps if s.compare]  # noqa: E731
    assert salts(a) != salts(b) and salts(a) == salts(soak.plan_round(0, records, catalogue, [], 6, seed=5))
    assert len(set(salts(a))) == len(soak.SALTS)


def test_the_salt_probe_uses_one_image_after_three_texts(records):
    probe = soak.plan_probe(records, 6)
    assert [s.body.get("cache_salt") for s in probe] == ["probe-a", "probe-b", "probe-a"]
    imgs = [s.body["messages"][-1]["content"] for s in probe]
    assert len({json.dumps([c for c in x if c["type"] == "image_url"]) for x in imgs}) == 1
    assert len({json.dumps([c for c in x if c["type"] == "text"]) for x in imgs}) == 3
    assert "custom_params" not in probe[0].body and probe[1].body["custom_params"] == {"vlcache": {"policy": "none"}}
    assert soak.probe_verdict({"probe-b-other-salt": {"status": 200, "cached_tokens": 0},
                               "probe-a-same-salt": {"status": 200, "cached_tokens": 70}}, 64) == {
        "ran": True, "other_salt_cached": 0, "same_salt_cached": 70, "isolated": True, "same_salt_reused": True}
    assert not soak.probe_verdict({"probe-b-other-salt": {"status": 200, "cached_tokens": 64},
                                   "probe-a-same-salt": {"status": 200, "cached_tokens": 0}}, 64)["isolated"]


# ----- verdicts ---------------------------------------------------------------------------------

def test_parse_chat_reads_choices_in_order_cached_tokens_and_error_messages():
    ok = json.dumps({"choices": [{"index": 1, "message": {"content": "b"}}, {"index": 0, "message": {"content": "a"}}],
                     "usage": {"prompt_tokens_details": {"cached_tokens": 12}}})
    assert soak.parse_chat(200, ok) == {"status": 200, "texts": ["a", "b"], "cached_tokens": 12}
    err = json.dumps({"object": "error", "message": "local image '/proc/kmsg': no", "code": 400})
    assert soak.parse_chat(400, err)["message"] == "local image '/proc/kmsg': no"
    assert soak.parse_chat(0, "")["message"] == "" and soak.parse_chat(500, "boom")["message"] == "boom"


def _step(id_, kind="ok", **kw):
    return soak.Step(id_, kind, body={"messages": []}, compare=kind == "ok", **kw)


def test_logprobs_of_a_choice_and_the_margin_where_two_answers_part():
    choice = {"logprobs": {"content": [
        {"token": "3", "logprob": -0.1,
         "top_logprobs": [{"token": "4", "logprob": -2.5}, {"token": "3", "logprob": -0.1}]},
        {"token": "<|im_end|>", "logprob": 0.0, "top_logprobs": []}]}}
    tops = soak._token_tops(choice)
    assert tops == [["3", -0.1, -2.5], ["<|im_end|>", 0.0, None]]
    other = [["4", -0.6, -0.7], ["<|im_end|>", 0.0, None]]
    assert soak.first_difference_gaps(tops, other) == pytest.approx((2.4, 0.1))
    assert soak.smaller_gap((2.4, 0.1)) == pytest.approx(0.1) and soak.smaller_gap((None, None)) is None
    assert soak.first_difference_gaps(tops, tops) is None and soak._token_tops({"message": {}}) is None
    body = soak.chat_body(accuracy.Record("x", "<image>Q", ["data:image/png;base64,AA"], "a"), 6, "tenant-a", 2,
                          top_logprobs=soak.TOP_LOGPROBS)
    assert body["logprobs"] is True and body["top_logprobs"] == 2
    assert body["n"] == 2 and body["cache_salt"] == "tenant-a"


def test_a_mismatch_is_a_near_tie_only_when_both_servers_nearly_tie_at_every_differing_choice():
    tie = {"status": 200, "texts": ["yellow"], "tops": [[["yellow", -0.677, -0.739]]]}  # stock's gap 0.0625
    flip = {"status": 200, "texts": ["red"], "tops": [[["red", -0.708, -0.708]]]}  # an exact tie the other way
    steps = [_step("t"), _step("w"), _step("one"), _step("none")]
    sure = {"status": 200, "texts": ["red"], "tops": [[["red", -0.01, -4.6]]]}  # vlcache sure of another answer
    no_logprobs = {"status": 200, "texts": ["red"]}
    got = soak.compare(steps, {k: tie for k in ("t", "w", "one", "none")},
                       {"t": flip, "w": sure, "one": {"status": 200, "texts": ["red"], "tops": [[["red", -0.7, None]]]},
                        "none": no_logprobs})
    assert [w["id"] for w in got["near_ties"]] == ["t"]
    assert [w["id"] for w in got["wrong"]] == ["w", "one", "none"], "a sure answer, a missing gap, no logprobs"
    assert got["near_ties"][0]["gaps"] == [pytest.approx((0.062, 0.0))]
    two = {"status": 200, "texts": ["yellow", "yellow"], "tops": [[["yellow", -0.677, -0.739]]] * 2}
    half = {"status": 200, "texts": ["red", "blue"], "tops": [[["red", -0.708, -0.708]], [["blue", -0.01, -5.0]]]}
    assert soak.compare([_step("n2")], {"n2": two}, {"n2": half})["wrong"][0]["id"] == "n2", "every choice counts"
    assert soak.verdict(_report(compare=got))[1][0] == "3 wrong answers"


def test_a_refusal_both_servers_give_alike_is_not_unexpected():
    steps = [_step("m"), _step("x")]
    same = {"status": 400, "message": "The length of image_data should be equal to the batch size."}
    stock = {"m": same, "x": {"status": 200, "texts": ["1"]}}
    vl = {"m": dict(same), "x": {"status": 400, "message": "ours only"}}
    t_vl, t_st = soak.tally(steps, vl, stock), soak.tally(steps, stock, vl)
    assert t_vl["as_other"] == {"400": 1} and t_vl["unexpected"] == {"400": 1}
    assert t_vl["unexpected_ids"][0][0] == "x" and t_st["as_other"] == {"400": 1} and t_st["unexpected"] == {}
    assert not soak.same_error(same, {"status": 400, "message": "other words"})
    assert not soak.same_error(same, None) and not soak.same_error({"status": 0}, {"status": 0})


def test_a_saved_run_is_classified_again_from_its_json(tmp_path):
    tie_s = {"status": 200, "texts": ["yellow"], "tops": [[["yellow", -0.677, -0.739]]]}
    tie_v = {"status": 200, "texts": ["red"], "tops": [[["red", -0.708, -0.708]]]}
    refusal = {"status": 400, "message": "The length of image_data should be equal to the batch size."}
    report = _report(compare={"compared": 10, "wrong": [{"id": "t", "salt": None, "n": 1, "margin": 0.0}]},
                     meta={"date": "2026-12-01", "model": "m", "vlcache_flags": "--enable-vlcache", "rounds_planned": 2,
                           "concurrency": 4, "stream_s": 60.0, "chunked_prefill_size": 256},
                     rounds_complete={"stock": 1, "vlcache": 2})
    for label in ("stock", "vlcache"):
        report["tally"][label].update(unexpected={"400": 2}, unexpected_ids=[["m", "400 ..."], ["late", "400 ..."]])
    requests = [{"id": "t", "stock": tie_s, "vlcache": tie_v}, {"id": "m", "stock": refusal, "vlcache": refusal},
                {"id": "late", "stock": {"status": None, "outcome": "not sent"}, "vlcache": refusal}]
    saved = tmp_path / "old.json"
    saved.write_text(json.dumps({"report": report, "compared_alike_not_listed": 9, "requests": requests}))
    got = soak.main(["--rereport", str(saved), "--out-dir", str(tmp_path / "new")])
    assert got["compare"]["wrong"] == [] and [w["id"] for w in got["compare"]["near_ties"]] == ["t"]
    vl = got["tally"]["vlcache"]
    assert vl["as_other"] == {"400": 1} and vl["unexpected"] == {"400": 1}, "stock never sent 'late'"
    assert got["failures"] == ["vlcache: unexpected statuses 400×1", "stock: unexpected statuses 400×1"]
    md = (tmp_path / "new" / "soak.md").read_text()
    assert "## Near ties" in md and "gaps (0.0620, 0.0000)" in md
    assert json.loads((tmp_path / "new" / "soak.json").read_text())["report"]["meta"]["reclassified_from"]


def test_comparison_counts_only_requests_both_served_and_every_choice():
    steps = [_step("a"), _step("b"), _step("c"), _step("d"), _step("h", "hostile", expect=(400,))]
    stock = {"a": {"status": 200, "texts": ["1"]}, "b": {"status": 200, "texts": ["2", "2"]},
             "c": {"status": 200, "texts": ["3"]}, "d": {"status": 500}}
    vl = {"a": {"status": 200, "texts": ["1"]}, "b": {"status": 200, "texts": ["2", "9"]},
          "c": {"status": 400, "message": "x"}, "d": {"status": 200, "texts": ["4"]}, "h": {"status": 400}}
    got = soak.compare(steps, stock, vl)
    assert got["compared"] == 2 and [w["id"] for w in got["wrong"]] == ["b"]


def test_outcomes_and_tally_separate_expected_from_unexpected():
    steps = [_step("ok"), _step("bad", "hostile", expect=(400,), message="base64", name="junk"),
             _step("bad500", "hostile", expect=(400,), message="x", name="bomb"),
             _step("vague", "hostile", expect=(400,), message="aspect ratio", name="aspect"),
             _step("ab", "abort", expect=()), _step("ab2", "abort", expect=()),
             _step("fl", "flush_load", expect=(200, 400)), _step("late")]
    res = {"ok": {"status": 200, "texts": ["x"]}, "bad": {"status": 400, "message": "not valid base64"},
           "bad500": {"status": 500, "message": "Internal server error"}, "vague": {"status": 400, "message": "nope"},
           "ab": {"status": None, "complete": False}, "ab2": {"status": 200, "complete": True},
           "fl": {"status": 400}, "late": {"status": None, "outcome": "not sent", "why": "deadline"}}
    t = soak.tally(steps, res)
    assert (t["sent"], t["served"], t["not_sent"], t["aborted"], t["completed_before_close"]) == (7, 1, 1, 1, 1)
    assert t["expected"] == {400: 2} and t["unexpected"] == {"500": 1} and t["flushes"] == {"flush_load 400": 1}
    assert t["unexpected_ids"][0][0] == "bad500" and [u[0] for u in t["unclear_messages"]] == ["vague"]
    rows = {r["kind"]: r for r in soak.hostile_rows(steps, res)}
    assert rows["junk"]["clear"] and not rows["bomb"]["clear"] and not rows["aspect"]["clear"]


def _report(**over):
    base = {"meta": {}, "tally": {k: soak.tally([], {}) for k in ("stock", "vlcache")},
            "compare": {"compared": 10, "wrong": []}, "twins": [{"same": True}], "hostile": [],
            "probe": {"ran": True, "isolated": True, "other_salt_cached": 0, "same_salt_cached": 70},
            "health": {k: {"polls": 5, "failures": 0, "max_latency_s": 0.1} for k in ("stock", "vlcache")},
            "leaks": {k: {"count": 0, "lines": []} for k in ("stock", "vlcache")},
            "alive": {"stock": True, "vlcache": True}, "gauges": {"key_hits": 3.0, "evicted_images": 2.0}}
    base.update(over)
    base["passed"], base["failures"] = soak.verdict(base)
    return base


def test_long_messages_keep_their_head_and_their_reason():
    msg = "an image of the request could not be decoded: " + "A" * 500 + "...: image file is truncated"
    short = soak.elide(msg, 120)
    assert len(short) <= 120 and short.startswith("an image of the") and short.endswith("image file is truncated")
    assert soak.elide("short\nmessage") == "short message"


def test_the_verdict_names_each_failed_check_and_the_table_shows_it():
    good = _report()
    assert good["passed"] and good["failures"] == []
    table = soak.short_table(good)
    assert table.splitlines()[0] == "| | stock | vlcache full |" and table.rstrip().endswith("**PASS**")
    assert "| answers compared with stock / WRONG / near ties (both gaps ≤ 0.07) | – | 10 / **0** / 0 |" in table
    gauges = "| vlcache gauges: stored / evicted / store_skipped / second_generation_skipped | – | – / 2 / – / – |"
    assert gauges in table
    bad = _report(compare={"compared": 10, "wrong": [{"id": "x"}]}, twins=[{"same": False}],
                  leaks={"stock": {"count": 0, "lines": []}, "vlcache": {"count": 2, "lines": ["leak"]}},
                  health={"stock": {"polls": 5, "failures": 0, "max_latency_s": 0.1},
                          "vlcache": {"polls": 5, "failures": 1, "max_latency_s": 10.0}},
                  probe={"ran": True, "isolated": False, "other_salt_cached": 64, "same_salt_cached": 64},
                  alive={"stock": True, "vlcache": False})
    assert not bad["passed"]
    assert bad["failures"] == ["1 wrong answers", "vlcache: 2 leak reports", "vlcache: 1 /health failures",
                               "vlcache: not alive at the end", "base64 verdict differs cached vs not",
                               "an image was reused across salts"]
    assert "**FAIL**: 1 wrong answers;" in soak.short_table(bad)


# ----- dry runs against fake servers -------------------------------------------------------------

def _dry_run(tmp_path, vl_faults=None, rounds=2, extra=()):
    data = _dataset(tmp_path / "data")
    stock_h, vl_h = fake_sglang.make_handler(), fake_sglang.make_handler(**(vl_faults or {}))
    (s1, u1), (s2, u2) = fake_sglang.serve(stock_h), fake_sglang.serve(vl_h)
    log = tmp_path / "vl.log"
    log.write_text("server started\n")
    try:
        report = soak.main(["--stock-url", u1, "--vlcache-url", u2, "--vlcache-log", str(log),
                            "--data-dir", str(data), "--out-dir", str(tmp_path / "out"), "--rounds", str(rounds),
                            "--stream-s", "60", "--idle-s", "0.2", "--concurrency", "4", "--image-tokens", "64",
                            "--progress", str(tmp_path / "progress.log"), "--health-every-s", "0.1", *extra])
    finally:
        s1.shutdown()
        s2.shutdown()
    return report, vl_h


def test_a_dry_run_against_well_behaved_fakes_passes_every_check(tmp_path, capsys):
    report, vl_h = _dry_run(tmp_path)
    assert report["passed"], report["failures"]
    vl = report["tally"]["vlcache"]
    assert vl["unexpected"] == {} and vl["not_sent"] == 0 and vl["driver_errors"] == 0
    # 2 rounds x 23 hostile kinds (2 of them twice: before and after) answered 400; idle flushes 200,
    # flushes under load 200 or 400.
    assert vl["expected"] == {400: 2 * 25}
    assert vl["flushes"]["flush_idle 200"] == 2 and sum(vl["flushes"].values()) == 2 + 2 * 2
    assert vl["aborted"] + vl["completed_before_close"] == 2 * 6 and vl["aborted"] >= 6
    assert report["compare"]["compared"] == 2 * (12 + 12 + 4 + 1 + 3) and report["compare"]["wrong"] == []
    assert {r["kind"] for r in report["hostile"]} >= {"bomb_20000x20000", "proc_kmsg_abs", "url_refused",
                                                      "junk_base64:before", "junk_base64:after"}
    assert all(r["clear"] for r in report["hostile"]), [r for r in report["hostile"] if not r["clear"]]
    assert len(report["twins"]) == 4 and all(t["same"] for t in report["twins"])
    assert report["probe"]["isolated"] and report["probe"]["same_salt_reused"]
    assert report["rounds_complete"] == {"stock": 2, "vlcache": 2}
    assert report["health"]["vlcache"]["polls"] >= 1 and report["health"]["vlcache"]["failures"] == 0
    assert report["gauges"]["key_hits"] > 0 and report["gauges"]["evicted_images"] > 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("**PASS**"), "the short table comes last"
    md = (tmp_path / "out" / "soak.md").read_text()
    assert "| bomb_20000x20000 | [400] | 400×2 | yes |" in md
    saved = json.loads((tmp_path / "out" / "soak.json").read_text())
    assert saved["report"]["passed"] and saved["compared_alike_not_listed"] == 64
    assert {r["kind"] for r in saved["requests"]} == {"hostile", "abort", "flush_idle", "flush_load", "probe"}
    assert not list(Path("/tmp").glob(f"vlcache-soak-large-{__import__('os').getpid()}.png")), "the large file is gone"


def test_the_dry_run_catches_each_fault(tmp_path):
    report, _ = _dry_run(tmp_path, {"wrong_when_n2": True, "bomb_is_500": True, "junk_served_when_cached": True,
                                    "reuse_across_salts": True, "health_fails": 2}, rounds=3)
    assert not report["passed"]
    f = report["failures"]
    assert any("wrong answers" in x for x in f) and all(w["n"] == 2 for w in report["compare"]["wrong"])
    assert all(w["margin"] == pytest.approx(3.0) for w in report["compare"]["wrong"]), "not a near tie"
    assert any("unexpected statuses 200×" in x and "500×3" in x for x in f), f
    assert "base64 verdict differs cached vs not" in f and "an image was reused across salts" in f
    assert "vlcache: 2 /health failures" in f
    rows = {r["kind"]: r for r in report["hostile"]}
    assert rows["bomb_20000x20000"]["statuses"] == {500: 3} and not rows["bomb_20000x20000"]["clear"]


@pytest.mark.parametrize("limit", [("--stream-s", "4"), ("--deadline-unix", "1", "--min-stream-s", "4")],
                         ids=["stream-s", "past-deadline-min-stream"])
def test_a_deadline_leaves_the_rest_not_sent_and_the_first_round_whole(tmp_path, monkeypatch, limit):
    real_run = soak.Stream._run

    def slow(self, step):  # ~40 ms per step sent: 30 rounds of ~60 steps cannot fit in 4 s at 4 in flight
        if not self._cut():
            time.sleep(0.04)
        return real_run(self, step)

    monkeypatch.setattr(soak.Stream, "_run", slow)
    report, _ = _dry_run(tmp_path, rounds=30, extra=limit)
    vl = report["tally"]["vlcache"]
    assert vl["not_sent"] > 0 and report["rounds_complete"]["vlcache"] >= 1
    assert report["passed"], report["failures"]


def test_the_launcher_path_with_fake_server_processes_greps_their_logs(tmp_path):
    data = _dataset(tmp_path / "data")
    script = str(Path(fake_sglang.__file__))

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    ports = [free_port(), free_port()]
    servers = [launch.Server("stock", [], ports[0], tmp_path / "logs", command=[sys.executable, script, str(ports[0])],
                             timeout_s=20, poll_s=0.05),
               launch.Server("vlcache", [], ports[1], tmp_path / "logs", timeout_s=20, poll_s=0.05,
                             command=[sys.executable, script, str(ports[1]), "--fault", "leak_line"])]
    args = soak.parse_args(["--model", "fake", "--log-dir", str(tmp_path / "logs"), "--data-dir", str(data),
                            "--out-dir", str(tmp_path / "out"), "--rounds", "2", "--idle-s", "0.2",
                            "--concurrency", "4", "--image-tokens", "64"])
    report = soak.run_with_servers(args, servers, print)
    assert all(s.proc is None for s in servers), "stopped"
    assert report["alive"] == {"stock": True, "vlcache": True}
    assert report["leaks"]["vlcache"]["count"] >= 1 and report["leaks"]["stock"]["count"] == 0
    assert report["failures"] == [f"vlcache: {report['leaks']['vlcache']['count']} leak reports"]
    assert "fake SGLang serving" in (tmp_path / "out" / "server_tails.txt").read_text()


def test_the_servers_differ_only_by_vlcache_full_with_a_small_store(tmp_path):
    data = _dataset(tmp_path / "data")
    args = soak.parse_args(["--model", "/ckpt", "--log-dir", str(tmp_path), "--data-dir", str(data),
                            "--out-dir", str(tmp_path / "o"), "--image-tokens", "64"])
    stock, vl = soak.build_servers(args)
    a, b = stock.argv(), vl.argv()
    extra = b[len(a) - 6:len(b) - 6]  # before --host/--port/--mem-fraction-static
    assert a[:len(a) - 6] == b[:len(a) - 6] and stock.port != vl.port
    assert extra == ["--enable-vlcache", "--vlcache-policy", "full", "--vlcache-mm-store-tokens", "384"]
    for flag in ("--disable-cuda-graph", "--enable-metrics", "--enable-cache-report"):
        assert flag in a
    assert a[a.index("--chunked-prefill-size") + 1] == "256" and a[a.index("--model-path") + 1] == "/ckpt"


def test_an_abort_that_cannot_connect_is_unexpected():
    step = soak.Step("a", "abort", body={}, expect=(), abort={"after_s": 0.0})
    assert soak.outcome(step, {"status": 0, "complete": False}) == "unexpected"
    assert soak.outcome(step, {"status": 200, "complete": False}) == "aborted"
    stream = soak.Stream("x", "http://127.0.0.1:9", 1, 1.0, None)
    assert stream._run(step)["status"] == 0


def test_the_script_parses_and_passes_only_options_soak_takes():
    import re

    script = ROOT / "benchmarks" / "soak.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    call = text[text.index("python3 -m benchmarks.soak"):]
    call = call[:call.index('>"$OUT/soak.log"')]
    source = Path(soak.__file__).read_text()
    for flag in re.findall(r"(--[a-z][a-z-]+)", call):
        assert f'"{flag}"' in source, f"soak.sh passes {flag}, which soak.py does not take"
    make_eval = (ROOT / "benchmarks" / "tiny_vlm" / "make_eval.py").read_text()
    call = text[text.index("python3 -m benchmarks.tiny_vlm.make_eval"):]
    for flag in re.findall(r"(--[a-z][a-z-]+)", call[:call.index("\n\n")]):
        assert f'"{flag}"' in make_eval, f"soak.sh passes {flag}, which make_eval does not take"
    assert "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE=1" in text and "REUSE_CKPT" in text


def test_a_dry_run_on_make_evals_sets_as_soak_sh_writes_them(tmp_path):
    """The data path of the GPU run: make_eval's A, B and multi for the benchmark's task (8 x 8 cells of
    28 px: 64 tokens per image, read from the PNG), with soak.sh's sizes."""
    from benchmarks.tiny_vlm.batches import TaskConfig
    from benchmarks.tiny_vlm.make_eval import main as make_eval

    (tmp_path / "ckpt").mkdir()
    TaskConfig(layouts=(("a", 0.45), ("b", 0.3), ("multi", 0.25))).save(tmp_path / "ckpt")
    make_eval(["--model", str(tmp_path / "ckpt"), "--out-dir", str(tmp_path / "eval"), "--regimes", "A,B,multi",
               "--images", "16", "--repeats", "4", "--multi-requests", "16"])
    stock_h, vl_h = fake_sglang.make_handler(), fake_sglang.make_handler()
    (s1, u1), (s2, u2) = fake_sglang.serve(stock_h), fake_sglang.serve(vl_h)
    try:
        report = soak.main(["--stock-url", u1, "--vlcache-url", u2, "--data-dir", str(tmp_path / "eval"),
                            "--out-dir", str(tmp_path / "out"), "--rounds", "1", "--idle-s", "0",
                            "--health-every-s", "0.1"])
    finally:
        s1.shutdown()
        s2.shutdown()
    assert report["meta"]["image_tokens"] == 64 and report["meta"]["records"] == 16 * 4 * 2 + 16
    assert report["meta"]["store_tokens"] == 6 * 64
    assert report["passed"], report["failures"]
    assert report["compare"]["compared"] == 16 * 4 * 2 + 16 + 1 + 3
