"""affinity.py without a GPU: the workload per arm, Qwen's token count, the table, and whole runs with
fake replicas (tests/benchmarks/fake_sglang.py) behind a fake router, and behind the real smg router
when it is importable (benchmarks/pack_router.sh, then PYTHONPATH=<unpacked> pytest ...)."""

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import affinity  # noqa: E402
import launch  # noqa: E402

HERE = Path(__file__).resolve().parent
FAKE = f"{sys.executable} {HERE / 'fake_sglang.py'} {{port}} --store-images {{store_images}} --dp-size {{dp_size}}"


def args_for(tmp_path, *more):
    return affinity.parse_args(["--out-dir", str(tmp_path / "out"), "--log-dir", str(tmp_path / "logs"),
                                "--image-size", "64", "48", *more])


def free_base_port() -> int:
    for _ in range(50):
        base = random.randint(32000, 60000)
        if not any(launch.port_in_use("127.0.0.1", base + i) for i in range(3)):
            return base
    raise RuntimeError("no three free ports")


def test_qwen_image_tokens_match_the_processor():
    assert affinity.qwen_image_tokens(1920, 1080) == 39 * 69  # 1092 x 1932 after smart_resize
    assert affinity.qwen_image_tokens(3840, 2160) == 77 * 137
    assert affinity.qwen_image_tokens(64, 48) == 4  # 56 x 56, the processor's minimum


def test_every_arm_sends_the_same_requests_with_its_own_images(tmp_path):
    args = args_for(tmp_path, "--requests", "24", "--pool-size", "6", "--store-images", "3", "--tenants", "2")
    a, b = affinity.arm_rows(args, 0), affinity.arm_rows(args, 1)
    urls = [[p["image_url"]["url"] for r in rows for m in r["messages"] if isinstance(m["content"], list)
             for p in m["content"] if p.get("type") == "image_url"] for rows in (a, b)]
    assert len(a) == len(b) == 24 and all(len(set(u)) == 6 for u in urls), "the whole pool is used"
    assert not set(urls[0]) & set(urls[1]), "no image carries over from one arm to the next"
    order = [list(dict.fromkeys(u)) for u in urls]  # each pool in first-seen order
    assert [order[0].index(x) for x in urls[0]] == [order[1].index(x) for x in urls[1]], "same image sequence"
    strip = lambda rows: [json.dumps(r).split("data:image")[0] for r in rows]  # noqa: E731
    assert strip(a) == strip(b)
    assert [r["cache_salt"] for r in a] == ["tenant-0", "tenant-1"] * 12


def test_arguments_are_checked(tmp_path):
    with pytest.raises(SystemExit):
        args_for(tmp_path, "--arms", "round_robin,sticky")
    with pytest.raises(SystemExit):
        args_for(tmp_path, "--pool-size", "4", "--store-images", "4")  # one store would hold the pool


def test_replicas_serve_the_default_policy_unless_told(tmp_path):
    def policy_of(*more):
        flags = [s.flags for s in affinity.replica_servers(args_for(tmp_path, *more))]
        assert flags[0] == flags[1], "both replicas alike"
        return flags[0][flags[0].index("--vlcache-policy") + 1], flags[0]

    assert policy_of()[0] == affinity.VLCacheConfig.policy
    policy, flags = policy_of("--replica-policy", "first_k:16")
    assert policy == "first_k" and flags[flags.index("--vlcache-first-k") + 1] == "16"
    assert "--vlcache-experimental-parallel" not in flags
    for server in affinity.replica_servers(args_for(tmp_path, "--layout", "gpu-each", "--gpus-per-replica", "2")):
        assert server.flags[server.flags.index("--tp-size") + 1] == "2", "a replica's GPUs are its TP group"
        assert "--vlcache-experimental-parallel" in server.flags, "vlcache refuses TP without it"


def test_the_dp_layout_is_one_server_with_two_ranks(tmp_path):
    (server,) = affinity.replica_servers(args_for(tmp_path, "--layout", "dp"))
    assert server.flags[server.flags.index("--dp-size") + 1] == "2"
    assert "--vlcache-experimental-parallel" in server.flags


def test_table_shows_missing_values_as_dashes():
    row = {"arm": "round_robin", "router": "--policy round_robin", "keyed": False, "ok": 0, "requests": 3,
           "hit_rate": None, "key_hits": 0.0, "key_lookups": 0.0, "lookups_per_replica": [0.0, 0.0],
           "ttft_p50_ms": None, "ttft_p90_ms": None}
    table = affinity.table_md([row])
    assert "| round_robin | `--policy round_robin` | 0 / 3 | – | 0 / 0 | 0 / 0 | – | – |" in table


def test_percentile():
    assert affinity.percentile([], 50) is None
    assert affinity.percentile([7.0], 90) == 7.0
    assert affinity.percentile([float(x) for x in range(1, 101)], 90) == pytest.approx(90.1)


def _run(tmp_path, router_command, *more):
    argv = [*more, "--out-dir", str(tmp_path / "out"), "--log-dir", str(tmp_path / "logs"), "--image-size", "64", "48",
            "--requests", "30", "--concurrency", "6", "--replica-command", FAKE, "--base-port",
            str(free_base_port()), "--server-timeout-s", "60"]
    if router_command:
        argv += ["--router-command", router_command]
    report = affinity.main(argv)
    return {r["arm"]: r for r in report["arms"]}, tmp_path / "out"


def test_a_dry_run_behind_a_fake_router_shows_affinity(tmp_path):
    arms, out = _run(tmp_path, f"{sys.executable} {HERE / 'fake_router.py'}")
    assert list(arms) == ["round_robin", "affinity", "cache_aware"]
    assert all(a["errors"] == 0 and a["key_lookups"] == 30 for a in arms.values())
    # 10 images, 5 per store: pinned, each replica holds its half, so only first sights miss.
    assert arms["affinity"]["key_hits"] == 20 and arms["affinity"]["lookups_per_replica"] != [30, 0]
    assert arms["round_robin"]["hit_rate"] < arms["affinity"]["hit_rate"] - 0.05  # RR varies with arrival order
    assert arms["affinity"]["keyed"] and not arms["round_robin"]["keyed"]
    rows = [json.loads(line) for line in open(out / "requests.jsonl")]
    assert {r["arm"] for r in rows} == set(arms) and len(rows) == 90
    assert all(r["routing_key"] for r in rows if r["arm"] == "affinity")
    assert not any(r["routing_key"] for r in rows if r["arm"] != "affinity")
    assert "| affinity |" in (out / "affinity.md").read_text()


def test_a_dry_run_with_dp_ranks_routes_keys_to_ranks(tmp_path):
    # --dp-size 2: one server, a store per rank, the rank chosen by the router and carried in the body;
    # the fake publishes per-rank gauges (label dp_rank) as the real schedulers do.
    arms, out = _run(tmp_path, f"{sys.executable} {HERE / 'fake_router.py'}", "--layout", "dp", "--arms",
                     "round_robin,affinity")
    assert arms["affinity"]["key_hits"] == 20 and arms["affinity"]["lookups_per_replica"] == [30]
    assert arms["round_robin"]["hit_rate"] < arms["affinity"]["hit_rate"] - 0.05  # RR varies with arrival order
    assert arms["round_robin"]["key_lookups"] == 30, "both ranks' lookups counted"
    assert "summed over the DP ranks" in (out / "affinity.md").read_text()


@pytest.mark.skipif(importlib.util.find_spec("smg") is None, reason="smg (SGLang's router) is not importable; "
                    "bash benchmarks/pack_router.sh and unpack it onto PYTHONPATH to run this")
def test_a_dry_run_behind_the_real_router(tmp_path):
    arms, _ = _run(tmp_path, None)
    assert all(a["errors"] == 0 and a["key_lookups"] == 30 for a in arms.values())
    assert arms["round_robin"]["lookups_per_replica"] == [15, 15]
    assert arms["affinity"]["hit_rate"] > arms["round_robin"]["hit_rate"]
