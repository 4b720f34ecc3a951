"""Server plan and the per-kind table of serve_eval (the servers themselves run on the GPU host)."""

import json

import pytest

from benchmarks.tiny_vlm.serve_eval import kind_table, running_first_then_rest, server_plan


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


class _FakeServer:
    """Records start / wait_healthy / stop into a shared event list; may fail its health wait."""

    def __init__(self, label, events, fail=False):
        self.label, self.events, self.fail = label, events, fail

    def start(self):
        self.events.append(("start", self.label))

    def wait_healthy(self):
        self.events.append(("healthy", self.label))
        if self.fail:
            raise RuntimeError(f"{self.label} did not come up")

    def stop(self):
        self.events.append(("stop", self.label))


def test_first_server_comes_up_alone_then_the_rest_together_and_all_stop():
    events = []
    servers = [_FakeServer(x, events) for x in "abc"]
    with running_first_then_rest(servers):
        events.append(("run", ""))
    assert events == [("start", "a"), ("healthy", "a"), ("start", "b"), ("start", "c"),
                      ("healthy", "b"), ("healthy", "c"), ("run", ""),
                      ("stop", "a"), ("stop", "b"), ("stop", "c")]


def test_a_first_server_that_fails_stops_it_and_the_rest_never_start():
    events = []
    servers = [_FakeServer("a", events, fail=True), _FakeServer("b", events), _FakeServer("c", events)]
    with pytest.raises(RuntimeError, match="a did not come up"):
        with running_first_then_rest(servers):
            events.append(("run", ""))
    assert ("run", "") not in events and ("start", "b") not in events
    assert events[-1:] == [("stop", "a")]


def test_a_later_server_that_fails_stops_every_started_one():
    events = []
    servers = [_FakeServer("a", events), _FakeServer("b", events, fail=True), _FakeServer("c", events)]
    with pytest.raises(RuntimeError, match="b did not come up"):
        with running_first_then_rest(servers):
            events.append(("run", ""))
    assert ("run", "") not in events
    assert events[-3:] == [("stop", "a"), ("stop", "b"), ("stop", "c")]
