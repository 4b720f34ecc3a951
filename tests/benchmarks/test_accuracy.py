"""accuracy.py without a GPU: dataset validation, normalisation, repeat occurrences, and the summary
over canned server answers (HTTP mocked)."""

import json
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import accuracy  # noqa: E402

RED = "data:image/png;base64,UkVE"
BLUE = "data:image/png;base64,QkxVRQ=="
GREEN = "data:image/png;base64,R1JFRU4="


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _rec(id_, images, answer, prompt=None, **kw):
    return {"id": id_, "prompt": prompt if prompt is not None else "Look: " + " and ".join(["<image>"] * len(images))
            + " What colour?", "images": images, "answer": answer, **kw}


def test_messages_put_images_at_the_markers():
    rec = accuracy.parse_record(_rec("a", [RED, BLUE], "x", prompt="<image>between<image> after", system="sys"),
                                Path("."))
    msgs = rec.messages()
    assert msgs[0] == {"role": "system", "content": "sys"}
    assert [(c["type"], c.get("text") or c["image_url"]["url"]) for c in msgs[1]["content"]] == [
        ("image_url", RED), ("text", "between"), ("image_url", BLUE), ("text", " after")]
    assert len(accuracy.parse_record(_rec("b", [], "x", prompt="text only"), Path(".")).messages()) == 1


def test_file_paths_become_data_urls(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"\x89PNG fake")
    rec = accuracy.parse_record(_rec("a", ["img/a.png"], "x"), tmp_path)
    assert rec.images[0].startswith("data:image/png;base64,")


@pytest.mark.parametrize("record, message", [
    (_rec("a", [RED], "x", prompt="no marker"), r"0 <image> marker\(s\) but there are 1 image"),
    (_rec("a", [RED], "x", prompt="<image><image>"), r"2 <image> marker\(s\) but there are 1 image"),
    (_rec("a", ["missing.png"], "x"), r"image file not found: .*missing.png"),
    (_rec("a", ["notes.txt"], "x"), "not an image file name"),
    (_rec("a", ["data:text/plain;base64,eA=="], "x"), "not a base64 image data URL"),
    ({"id": "a", "prompt": "<image>", "images": [RED]}, r"missing field\(s\) \['answer'\]"),
    (_rec("a", RED, "x"), "images must be a list"),
    (["not", "an", "object"], "must be a JSON object"),
])
def test_bad_records_name_the_line(tmp_path, record, message):
    (tmp_path / "notes.txt").write_text("x")
    path = _write(tmp_path / "eval.jsonl", [_rec("ok", [RED], "red"), record])
    with pytest.raises(ValueError, match=r"eval.jsonl:2: .*" + message):
        accuracy.load_dataset(path)


def test_dataset_level_errors(tmp_path):
    with pytest.raises(ValueError, match="dataset not found"):
        accuracy.load_dataset(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="no records"):
        accuracy.load_dataset(_write(tmp_path / "empty.jsonl", []))
    with pytest.raises(ValueError, match="duplicate id 'a'"):
        accuracy.load_dataset(_write(tmp_path / "dup.jsonl", [_rec("a", [RED], "r"), _rec("a", [BLUE], "b")]))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        accuracy.load_dataset(tmp_path / "bad.jsonl")


def test_repeat_occurrences_and_limit(tmp_path):
    path = _write(tmp_path / "eval.jsonl", [
        _rec("1", [RED], "red"), _rec("2", [RED], "red"),  # RED seen before
        _rec("3", [RED, BLUE], "x"),  # BLUE is new: not a repeat
        _rec("4", [BLUE, RED], "x"),  # both seen, other order
        _rec("5", [], "none", prompt="text only"),  # no images: never a repeat
        _rec("6", [GREEN, GREEN], "g"),  # twice in itself, never before
    ])
    assert [r.repeat for r in accuracy.load_dataset(path)] == [False, True, False, True, False, False]
    assert [r.id for r in accuracy.load_dataset(path, limit=2)] == ["1", "2"]


@pytest.mark.parametrize("raw, norm", [(" Red.\n", "red"), ("BLUE!", "blue"), ("dark green", "dark green"),
                                       ("yes ?!", "yes"), ("3.5", "3.5"), ("", "")])
def test_normalise(raw, norm):
    assert accuracy.normalise(raw) == norm


def test_parse_server_and_args():
    t = accuracy.parse_server("first_k:16=http://127.0.0.1:30002/")
    assert (t.label, t.policy, t.param, t.url) == ("first_k:16", "first_k", "16", "http://127.0.0.1:30002")
    assert accuracy.parse_server("stock=http://h:1").param is None
    with pytest.raises(ValueError, match="LABEL=http"):
        accuracy.parse_server("stock:30000")
    for argv in (["--server", "a=http://h:1", "--reference", "b"],
                 ["--server", "a=http://h:1", "--server", "a=http://h:2", "--reference", "a"]):
        with pytest.raises(SystemExit):
            accuracy.parse_args(["--dataset", "d", "--out-dir", "o", *argv])


def test_summary_on_canned_answers(tmp_path, monkeypatch, capsys):
    path = _write(tmp_path / "eval.jsonl", [_rec("1", [RED], "red"), _rec("2", [BLUE], "blue"),
                                            _rec("3", [RED], "red"), _rec("4", [BLUE], "blue")])
    # Per server, the answers in request order; the HTTP layer is mocked.
    canned = {"http://stock:1": ["Red.", "blue", "red", "Blue"],
              "http://none:2": ["red", "blue", "green", "green"],
              "http://fk:3": ["red", "blue", "red", RuntimeError("HTTP 500")]}
    gauges = {"http://stock:1": [{}, {}],
              "http://none:2": [{}, {"key_hits": 2, "key_misses": 2, "reused_tokens": 100, "recomputed_tokens": 0,
                                     "reused_token_layers": 400, "recomputed_token_layers": 0}],
              "http://fk:3": [{"key_hits": 5, "key_misses": 5, "reused_tokens": 500, "recomputed_tokens": 50,
                               "reused_token_layers": 2000, "recomputed_token_layers": 200},
                              {"key_hits": 7, "key_misses": 7, "reused_tokens": 700, "recomputed_tokens": 100,
                               "reused_token_layers": 2800, "recomputed_token_layers": 400}]}
    order, lock = [], threading.Lock()

    def post_chat(url, body, timeout_s=300):
        with lock:
            order.append((url, body["messages"][-1]["content"][1]["image_url"]["url"]))
            answer = canned[url].pop(0)
        assert body["temperature"] == 0 and body["max_tokens"] == 4
        if isinstance(answer, Exception):
            raise answer
        return {"choices": [{"message": {"content": answer}}]}

    monkeypatch.setattr(accuracy, "post_chat", post_chat)
    monkeypatch.setattr(accuracy, "fetch_gauges", lambda url: gauges[url].pop(0))
    monkeypatch.setattr(accuracy.plot, "try_plot", lambda kind, out: None)
    data = accuracy.main(["--dataset", str(path), "--server", "stock=http://stock:1", "--server", "none=http://none:2",
                          "--server", "first_k:8=http://fk:3", "--reference", "stock", "--out-dir",
                          str(tmp_path / "out"), "--max-tokens", "4"])
    for url in canned:
        assert [img for u, img in order if u == url] == [RED, BLUE, RED, BLUE], "file order within a server"
    s = {x["server"]: x for x in data["summary"]}
    assert (s["stock"]["accuracy"], s["stock"]["repeat_accuracy"], s["stock"]["agreement"]) == (1.0, 1.0, 1.0)
    assert s["stock"]["recomputed_fraction"] is None and s["stock"]["hit_rate"] is None
    assert (s["none"]["accuracy"], s["none"]["repeat_accuracy"], s["none"]["n_repeat"]) == (0.5, 0.0, 2)
    assert s["none"]["agreement"] == 0.5 and s["none"]["recomputed_fraction"] == 0.0 and s["none"]["hit_rate"] == 0.5
    assert s["first_k:8"]["accuracy"] == 0.75 and s["first_k:8"]["n_errors"] == 1
    assert s["first_k:8"]["recomputed_fraction"] == 0.25 and s["first_k:8"]["policy"] == "first_k"
    saved = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert saved["summary"] == data["summary"] and len(saved["requests"]) == 12
    md = (tmp_path / "out" / "accuracy.md").read_text()
    assert "| none | 4 | 0.500 | 0.000 (2) | 0.500 | 0.000 | 0.50 | 0 |" in md
    assert capsys.readouterr().out.rstrip().endswith(md.rstrip().splitlines()[-1])


def test_bad_dataset_exits_with_the_reason(tmp_path):
    path = _write(tmp_path / "eval.jsonl", [_rec("1", ["nope.png"], "red")])
    with pytest.raises(SystemExit, match="bad dataset: .*eval.jsonl:1: image file not found"):
        accuracy.main(["--dataset", str(path), "--server", "s=http://h:1", "--reference", "s", "--out-dir",
                       str(tmp_path)])


def test_http_layer_against_a_local_server():
    import http.server

    class H(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if body["messages"][-1]["content"][0]["text"] == "fail":
                self.send_response(500)
                self.end_headers()
                self.wfile.write(b"scheduler died")
                return
            self.send_response(200)
            self.end_headers()
            self.wfile.write(json.dumps({"choices": [{"message": {"content": " Red."}}]}).encode())

        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"sglang:vlcache_key_hits 3.0\n")

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    target = accuracy.Target("first_k:8", f"http://127.0.0.1:{srv.server_address[1]}")
    try:
        ok = accuracy.ask(target, accuracy.parse_record(_rec("1", [RED], "red"), Path(".")), 4)
        bad = accuracy.ask(target, accuracy.parse_record(_rec("2", [], "red", prompt="fail"), Path(".")), 4)
        gauges = accuracy.fetch_gauges(target.url)
    finally:
        srv.shutdown()
    assert ok["correct"] and ok["answer"] == "red" and ok["error"] is None
    assert not bad["correct"] and "HTTP 500" in bad["error"] and "scheduler died" in bad["error"]
    assert gauges == {"key_hits": 3.0}
