"""compression_accuracy.py against fake servers that read rows out worse as alpha falls."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fake_sglang  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import accuracy  # noqa: E402
import compression_accuracy as ca  # noqa: E402

from benchmarks.tiny_vlm.batches import TaskConfig  # noqa: E402
from benchmarks.tiny_vlm.grid_task import GridSpec  # noqa: E402
from benchmarks.tiny_vlm.make_eval import row_records, write_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TASK = TaskConfig(spec=GridSpec(cells=4, colours=("red", "green", "blue"), max_count=3), max_filler_words=8,
                  layouts=(("b", 1.0),), b_weights=(("row", 1.0),))


VOTERS = 10  # tokens every layer of the fake keeps, whatever alpha: the served share exceeds alpha


def _fake(answers: dict[str, str], wrong_below: float) -> type:
    """Answers each image's row; below `wrong_below` the last colour is wrong (2 of 3 images). A request
    at alpha < 1 counts as trimmed in the compression gauges: 100 prompt token-layers, of which
    alpha * 100 + VOTERS kept."""

    class Rows(fake_sglang.JsonHandler):
        bodies: list = []
        gauges = {"compress_kept_token_layers": 0.0, "compress_prompt_token_layers": 0.0}

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path.startswith("/flush_cache"):
                return self._send(200, "ok", "text/plain")
            body = json.loads(raw)
            type(self).bodies.append(body)
            url = next(c["image_url"]["url"] for m in body["messages"] if isinstance(m["content"], list)
                       for c in m["content"] if c["type"] == "image_url")
            answer, finish = answers[url], "stop"
            alpha = ((body.get("custom_params") or {}).get("vlcache") or {}).get("compress_ratio", 1.0)
            if alpha < 1.0:
                type(self).gauges["compress_kept_token_layers"] += alpha * 100 + VOTERS
                type(self).gauges["compress_prompt_token_layers"] += 100
            if alpha < wrong_below and sorted(answers).index(url) % 3:
                words = answer.split()
                answer, finish = " ".join(words[:-1] + ["yellow"]), "length"  # wrong, and ran to max_tokens
            self._send(200, json.dumps({"choices": [{"index": 0, "message": {"content": answer},
                                                     "finish_reason": finish}]}))

        def do_GET(self):
            metrics = "".join(f"sglang:vlcache_{k} {v}\n" for k, v in type(self).gauges.items())
            self._send(200, metrics if self.path.startswith("/metrics") else "", "text/plain")

    return Rows


def test_rows_per_alpha_score_accuracy_cells_and_agreement(tmp_path):
    records = row_records(TASK, 6, seed=3)
    write_jsonl(tmp_path / "R.jsonl", records)
    answers = {r["images"][0]: r["answer"] for r in records}
    good_h, lossy_h = _fake(answers, 0.0), _fake(answers, 0.3)
    good, lossy = fake_sglang.serve(good_h), fake_sglang.serve(lossy_h)
    try:
        rows = ca.main(["--dataset", str(tmp_path / "R.jsonl"), "--server", f"vlcache={good[1]}",
                        "--server", f"uniform={lossy[1]}", "--stock", good[1], "--alphas", "1,0.2,0.5",
                        "--out-dir", str(tmp_path / "out"), "--concurrency", "2"])
    finally:
        good[0].shutdown()
        lossy[0].shutdown()
    by = {(r["server"], r["alpha"]): r for r in rows}
    assert [(r["server"], r["alpha"]) for r in rows] == [("vlcache", 1.0), ("vlcache", 0.5), ("vlcache", 0.2),
                                                         ("uniform", 1.0), ("uniform", 0.5), ("uniform", 0.2)]
    assert by[("vlcache", 0.2)]["accuracy"] == 1.0 and by[("vlcache", 1.0)]["agree_stock"] == 1.0
    lossy_row = by[("uniform", 0.2)]
    assert lossy_row["accuracy"] == pytest.approx(2 / 6) and lossy_row["agree_uncompressed"] == pytest.approx(2 / 6)
    assert lossy_row["cell_accuracy"] == pytest.approx(1 - 4 / 6 / 4), "one of 4 cells wrong in 4 of 6"
    assert lossy_row["token_agree_uncompressed"] == pytest.approx(1 - 4 / 6 / 4)
    assert lossy_row["stopped"] == pytest.approx(2 / 6) and by[("vlcache", 0.2)]["stopped"] == 1.0
    assert "agree_stock" not in lossy_row and by[("uniform", 1.0)]["accuracy"] == 1.0
    md = (tmp_path / "out" / "compression.md").read_text()
    assert md.count("| uniform |") == 3 and "Answer prior" in md and "says nothing" not in md
    prior = json.loads((tmp_path / "out" / "compression.json").read_text())["answer_prior"]
    assert prior == accuracy.answer_prior([r["answer"] for r in records]) and prior < 1.0
    # The kept share each pass served, from the gauges' deltas over it (none trimmed at alpha 1).
    assert by[("uniform", 0.2)]["kept_measured"] == pytest.approx(0.2 + VOTERS / 100)
    assert by[("vlcache", 0.5)]["kept_measured"] == pytest.approx(0.5 + VOTERS / 100)
    assert by[("vlcache", 1.0)]["kept_measured"] is None
    # (run_pass ends every pass with one text-only request that flushes the gauges: no image, no override)
    overrides = [b["custom_params"]["vlcache"] for b in lossy_h.bodies if "custom_params" in b]
    assert sorted(o["compress_ratio"] for o in overrides) == [0.2] * 6 + [0.5] * 6 + [1.0] * 6
    assert {o["policy"] for o in overrides} == {"full"}, "reuse stays out of the comparison"
    assert sum("custom_params" not in b and b["max_tokens"] > 1 for b in good_h.bodies) == 6, "stock: no override"


def test_the_answer_prior_flags_a_model_that_reads_nothing():
    assert accuracy.answer_prior(["white white", "White white", "red white", "x"]) == 0.5
    with pytest.raises(ValueError, match="no answers"):
        accuracy.answer_prior([])
    rows = [{"alpha": 1.0, "accuracy": 0.305}, {"alpha": 0.5, "accuracy": 0.9}]
    assert "says nothing about compression" in ca.prior_line(0.3047, rows)
    assert "says nothing" not in ca.prior_line(0.10, rows) and "0.100" in ca.prior_line(0.10, rows)
    assert "says nothing" not in ca.prior_line(0.3, [{"alpha": 1.0, "accuracy": None}])


def test_the_reference_alpha_is_required_and_words_are_compared_by_position():
    with pytest.raises(SystemExit):
        ca.parse_args(["--dataset", "x", "--server", "a=http://h:1", "--out-dir", "o", "--alphas", "0.5,0.1"])
    assert ca.parse_args(["--dataset", "x", "--server", "a=http://h:1", "--out-dir", "o"]).alphas == \
        [1.0, 0.5, 0.2, 0.1, 0.05]
    assert ca.cell_accuracy("red blue green", "red green green") == pytest.approx(2 / 3)
    assert ca.cell_accuracy("red", "red green") == 0.5
    assert ca.token_agreement("red blue", "red blue white") == pytest.approx(2 / 3)
    assert ca.token_agreement("", "") == 1.0


def test_launched_servers_compress_only_on_request_and_the_script_passes_known_options():
    flags = ca.compression_server_flags("uniform")
    assert flags[flags.index("--vlcache-compress-ratio") + 1] == "1.0", "alpha 1 unless a request asks"
    assert flags[flags.index("--vlcache-compress-budget") + 1] == "uniform"
    sink = ca.compression_server_flags("vlcache+sink4")
    assert sink[sink.index("--vlcache-compress-budget") + 1] == "vlcache"
    assert sink[sink.index("--vlcache-compress-sink-tokens") + 1] == "4"
    assert "--vlcache-compress-sink-tokens" not in flags
    both = ca.compression_server_flags("vlcache+sink4+share0.5")
    assert both[both.index("--vlcache-compress-sink-tokens") + 1] == "4"
    assert both[both.index("--vlcache-compress-uniform-share") + 1] == "0.5"
    for bad in ("vlcache+sinkfour", "vlcache+share", "vlcache+share0.5.1", "vlcache+cap0.3"):
        with pytest.raises(ValueError, match="METHOD"):
            ca.compression_server_flags(bad)
    servers = ca.build_servers("/ckpt", ["vlcache", "uniform"], "/tmp/logs", 31000)
    assert [(s.label, s.port) for s in servers] == [("stock", 31000), ("vlcache", 31001), ("uniform", 31002)]
    assert "--enable-vlcache" not in servers[0].flags and "--enable-vlcache" in servers[2].flags
    for s in servers:  # one decode kernel everywhere: alpha 1.0 vs stock is token for token
        assert s.flags[s.flags.index("--decode-attention-backend") + 1] == "triton"
        assert "--disable-overlap-schedule" in s.flags
    script = (Path(__file__).resolve().parents[2] / "benchmarks" / "compression_bench.sh").read_text()
    call = script[script.index("python3 benchmarks/compression_accuracy.py"):].split(">")[0]
    options = [w for w in call.split() if w.startswith("--")]
    args = ca.parse_args([x for o in options for x in (o, "1.0" if o == "--alphas" else "1")])
    assert args.model and args.log_dir


def _task(compress_task: str, row_images: str = "") -> subprocess.CompletedProcess:
    script = 'source benchmarks/compression_task.sh && printf "%s\\n" "$TASK_VARIANT" "$TASK_CKPT" "$TASK_REGIME" "$TASK_EVAL_ARGS"'
    return subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "COMPRESS_TASK": compress_task, "ROW_IMAGES": row_images})


@pytest.mark.parametrize("compress_task, k, name, layout, regime", [
    ("counts", "", "counts", "b", "C"), ("present", "", "present", "b", "C"), ("present2x", "", "present2x", "b", "C"),
    ("rows", "1", "rows", "b", "R"), ("rows", "4", "mrows4", "mrow", "R")])
def test_the_scripts_task_variant_trains_what_make_eval_asks(compress_task, k, name, layout, regime):
    """compression_bench.sh, compression_sim.sh and train_tiny.sh train COMPRESS_TASK's variant
    (compression_task.sh) and make_eval's regime with the script's flags accepts that checkpoint's task."""
    from benchmarks.tiny_vlm.make_eval import compression_samples, regime_records
    from benchmarks.tiny_vlm.train import parse_args, task_from_args

    variant, ckpt, got_regime, eval_args = (_task(compress_task, k).stdout.splitlines() + [""])[:4]
    assert variant.split(":")[0] == name and ckpt == f"/tmp/tiny-{name}" and got_regime == regime
    task = task_from_args(parse_args(["--out", "x", *variant.split(":", 1)[1].split()]))
    assert task.layouts == ((layout, 1.0),) and (k in ("", "1") or task.row_images == int(k))
    assert task.spec.cell_px == (56 if name == "present2x" else 28)
    row_images = int(eval_args.split()[-1]) if eval_args else 1
    records = regime_records(task, regime, argparse.Namespace(images=2, seed=0, row_images=row_images))
    assert [len(r["images"]) for r in records] == [row_images] * 2
    assert {r["kind"] for r in records} == {s.kind for s in compression_samples(task, 2)}
    assert _task("rows", "7").returncode != 0 and "ROW_IMAGES must be 1..6" in _task("rows", "7").stderr
    assert _task("nope").returncode != 0 and "COMPRESS_TASK must be counts, present, present2x or rows" in _task("nope").stderr
    bench = (ROOT / "benchmarks" / "compression_bench.sh").read_text()
    call = bench[bench.index("python3 -m benchmarks.tiny_vlm.make_eval"):].split("|")[0]
    assert '--regimes "$TASK_REGIME"' in call and "$TASK_EVAL_ARGS" in call
    # One default K, set where the task is: REUSE_CKPT=1 after train_tiny.sh finds the checkpoint it left.
    assert _task("rows").stdout.splitlines()[0].startswith("mrows6:")
    for script in ("compression_bench.sh", "train_tiny.sh", "compression_sim.sh"):
        text = (ROOT / "benchmarks" / script).read_text()
        assert "ROW_IMAGES=" not in text and "source benchmarks/compression_task.sh" in text


def test_requests_a_cut_pass_never_sent_are_no_answers_not_wrong_ones():
    records = [accuracy.Record(id=f"r{i}", prompt="p", images=[], answer="red") for i in range(4)]
    target = accuracy.Target("vlcache", "http://x")

    def answered(i: int, correct: bool, error: str | None = None) -> dict:
        return {"id": f"r{i}", "text": "red" if correct else "blue", "correct": correct, "error": error,
                "latency_s": 0.1, "finish_reason": "stop"}

    results = [answered(0, True), answered(1, False), answered(2, False, "HTTP 500"),
               accuracy._not_sent(target, records[3], accuracy.NOT_SENT + "past the deadline")]
    row = ca.summarise("vlcache", 0.1, results, results, records)
    # A server error stays a wrong answer; the unsent request leaves the denominator.
    assert (row["n"], row["not_sent"], row["errors"], row["accuracy"]) == (3, 1, 1, pytest.approx(1 / 3))
    assert "| 1 (n 3, 1 not sent) |" in ca.table_md([row])
    assert accuracy.was_sent(results[2]) and not accuracy.was_sent(results[3])
