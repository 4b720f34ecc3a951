"""plot.py renders PNGs from the benchmark JSON (needs matplotlib: the `bench` extra)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import plot  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(preset, server, conc, ttft, rps):
    return {"preset": preset, "server": server, "concurrency": conc, "ttft_p50_ms": ttft, "req_per_s": rps}


def _needs_matplotlib():
    pytest.importorskip("matplotlib", reason="plots need matplotlib (pip install -e .[bench])")


def test_serving_png(tmp_path):
    _needs_matplotlib()
    rows = [_row(p, s, c, t, r) for p in ("single-1080p", "multi-4k") for c in (1, 16)
            for s, t, r in (("stock", 220.0, 4.0), ("vlcache-first_k", 70.0, 9.0))]
    rows.append({"preset": "multi-4k", "server": "vlcache-none", "concurrency": 1, "error": "died"})
    (tmp_path / "serving.json").write_text(json.dumps({"meta": {"gpu": "H200", "date": "d"}, "rows": rows}))
    out = plot.plot_serving(tmp_path)
    assert out == tmp_path / "serving.png" and out.read_bytes()[:8] == PNG_MAGIC


def test_accuracy_png_via_cli(tmp_path, capsys):
    _needs_matplotlib()
    summary = [{"server": "stock", "policy": "stock", "accuracy": 0.9, "recomputed_fraction": None},
               {"server": "none", "policy": "none", "accuracy": 0.6, "recomputed_fraction": 0.0},
               {"server": "full", "policy": "full", "accuracy": 0.9, "recomputed_fraction": 1.0},
               {"server": "first_k:8", "policy": "first_k", "accuracy": 0.7, "recomputed_fraction": 0.03},
               {"server": "first_k:64", "policy": "first_k", "accuracy": 0.85, "recomputed_fraction": 0.25}]
    (tmp_path / "accuracy.json").write_text(json.dumps({"meta": {"dataset": "eval.jsonl"}, "summary": summary}))
    plot.main(["accuracy", str(tmp_path)])
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == PNG_MAGIC
    assert "accuracy.png" in capsys.readouterr().out


def test_missing_or_empty_input_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        plot.plot_serving(tmp_path)
    (tmp_path / "serving.json").write_text(json.dumps({"rows": [{"preset": "p", "server": "s", "concurrency": 1,
                                                                  "error": "x"}]}))
    with pytest.raises(SystemExit, match="no successful runs"):
        plot.plot_serving(tmp_path)


def test_try_plot_after_a_run_reports_instead_of_failing(tmp_path, capsys):
    plot.try_plot("serving", tmp_path)  # no serving.json: the run's table must still be printed after this
    out = capsys.readouterr().out
    assert "does not exist" in out and f"plot later with `python benchmarks/plot.py serving {tmp_path}`" in out


def test_sweep_plots_accuracy_on_repeats_and_the_knob(tmp_path):
    _needs_matplotlib()
    summary = [{"server": "full", "policy": "full", "accuracy": 0.9, "repeat_accuracy": 0.88, "recomputed_fraction": 1.0},
               {"server": "vlcache:0.05", "policy": "vlcache", "accuracy": 0.8, "repeat_accuracy": None,
                "recomputed_fraction": 0.06},  # e.g. every request failed: no point
               {"server": "stock", "policy": "stock", "accuracy": 0.9, "repeat_accuracy": 0.88, "recomputed_fraction": None}]
    (tmp_path / "accuracy.json").write_text(json.dumps({"meta": {"plot_y": "repeat_accuracy"}, "summary": summary}))
    assert plot.plot_accuracy(tmp_path).read_bytes()[:8] == PNG_MAGIC
    knob = {"shares": [["B", 0.0], ["mix-0.5", 0.5], ["A", 1.0]],
            "rows": {"full": {"B": 0.9, "mix-0.5": 0.85, "A": 0.8}, "none": {"B": 0.8, "A": 0.3}}}
    (tmp_path / "knob.json").write_text(json.dumps(knob))
    plot.main(["knob", str(tmp_path)])
    assert (tmp_path / "knob.png").read_bytes()[:8] == PNG_MAGIC
    (tmp_path / "knob.json").write_text(json.dumps({"shares": [], "rows": {}}))
    with pytest.raises(SystemExit, match="no config"):
        plot.plot_knob(tmp_path)


def test_compression_png(tmp_path):
    _needs_matplotlib()
    rows = [{"server": s, "alpha": a, "accuracy": acc, "token_agree_uncompressed": acc}
            for s in ("vlcache", "uniform") for a, acc in ((1.0, 0.9), (0.1, 0.8 if s == "vlcache" else 0.5))]
    (tmp_path / "compression.json").write_text(json.dumps({"rows": rows + [{"server": "x", "alpha": 0.5,
                                                                             "accuracy": None}]}))
    out = plot.plot_compression(tmp_path)
    assert out == tmp_path / "compression.png" and out.read_bytes()[:8] == PNG_MAGIC
    (tmp_path / "compression.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit, match="no row"):
        plot.plot_compression(tmp_path)
