"""The workload generator: recurring images after different text, loadable by bench_serving."""

import collections
import dataclasses
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import workloads  # noqa: E402

SMALL = (56, 56)  # tiny images keep the test fast; the structure is what is tested


def _image_urls(row):
    return [c["image_url"]["url"] for m in row["messages"] if isinstance(m["content"], list)
            for c in m["content"] if c["type"] == "image_url"]


@pytest.mark.parametrize("preset", list(workloads.PRESETS))
def test_presets_recur_images_after_different_text(preset):
    spec = dataclasses.replace(workloads.PRESETS[preset], num_requests=40)
    rows = list(workloads.generate(spec, size_override=SMALL))
    assert len(rows) == 40
    urls = [u for r in rows for u in _image_urls(r)]
    assert len(set(urls)) <= spec.pool_size < len(urls), "images come back"
    lo, hi = spec.images_per_request
    assert all(lo <= len(_image_urls(r)) <= hi for r in rows)
    by_image = collections.defaultdict(set)
    for r in rows:
        for u in _image_urls(r):
            by_image[u].add(json.dumps(r["messages"][:-1]) + r["messages"][-1]["content"][0]["text"])
    assert any(len(texts) > 1 for texts in by_image.values()), "the same image after different text"
    assert all(r["max_tokens"] == spec.output_len for r in rows)


def test_history_turns_and_determinism():
    spec = dataclasses.replace(workloads.PRESETS["chat-history"], num_requests=10, seed=5)
    a = list(workloads.generate(spec, size_override=SMALL))
    assert a == list(workloads.generate(spec, size_override=SMALL)), "same seed, same workload"
    assert any(len(r["messages"]) >= 4 for r in a), "earlier turns before the images"
    other = list(workloads.generate(dataclasses.replace(spec, seed=6), size_override=SMALL))
    assert other != a


def test_zipf_skews_popularity():
    p = workloads.popularity(10, 1.2)
    assert abs(p.sum() - 1) < 1e-9 and p[0] > 3 * p[5]
    assert (workloads.popularity(10, 0.0) == 0.1).all()
    spec = workloads.WorkloadSpec(num_requests=300, pool_size=10, zipf=1.2, resolution="720p")
    counts = collections.Counter(u for r in workloads.generate(spec, size_override=SMALL) for u in _image_urls(r))
    most, least = counts.most_common()[0][1], counts.most_common()[-1][1]
    assert most > 3 * least


@pytest.mark.parametrize("bad", [dict(resolution="8k"), dict(images_per_request=(0, 2)),
                                 dict(images_per_request=(2, 9)), dict(pool_size=2, images_per_request=(3, 3))])
def test_bad_specs_are_refused(bad):
    with pytest.raises(ValueError):
        workloads.WorkloadSpec(**bad)


def test_cli_writes_jsonl_that_bench_serving_loads(tmp_path, qwen_model_dir, monkeypatch):
    from sglang.benchmark.datasets.openai_dataset import sample_openai_requests
    from transformers import AutoTokenizer

    out = tmp_path / "w.jsonl"
    monkeypatch.setattr(workloads, "RESOLUTIONS", {k: SMALL for k in workloads.RESOLUTIONS})
    workloads.main(["--preset", "multi-4k", "--num-requests", "6", "--out", str(out), "--output-len", "5"])
    rows = sample_openai_requests(str(out), 6, AutoTokenizer.from_pretrained(qwen_model_dir))
    assert len(rows) == 6 and all(r.output_len == 5 for r in rows)
    assert all(sum(c.get("type") == "image_url" for c in r.prompt[-1]["content"]) == 4 for r in rows)
