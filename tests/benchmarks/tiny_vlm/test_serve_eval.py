"""Server plan and the per-kind table of serve_eval (the servers themselves run on the GPU host)."""

import json

from benchmarks.tiny_vlm.serve_eval import kind_table, server_plan


def test_plan_has_stock_full_none_and_each_k():
    plan = dict(server_plan([2, 16]))
    assert list(plan) == ["stock", "full", "none", "first_k:2", "first_k:16"]
    assert plan["stock"] == []
    assert plan["first_k:16"][-2:] == ["--vlcache-first-k", "16"]
    assert all("--enable-vlcache" in f for label, f in plan.items() if label != "stock")


def test_kind_table_counts_repeats_only(tmp_path):
    reqs = [{"server": "full", "id": "0000-0-count", "repeat": False, "correct": False},
            {"server": "full", "id": "0000-1-count", "repeat": True, "correct": True},
            {"server": "full", "id": "0000-2-cell", "repeat": True, "correct": False},
            {"server": "none", "id": "0000-1-count", "repeat": True, "correct": False}]
    path = tmp_path / "accuracy.json"
    path.write_text(json.dumps({"requests": reqs, "summary": [{"server": "full"}, {"server": "none"}]}))
    lines = kind_table(path).splitlines()
    assert lines[0] == "| server | cell (repeats) | count (repeats) |"
    assert lines[2] == "| full | 0.000 (1) | 1.000 (1) |"
    assert lines[3] == "| none | – | 0.000 (1) |"
