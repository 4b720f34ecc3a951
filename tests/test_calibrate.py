"""calibrate on a tiny random-weight Qwen2.5-VL saved to disk: the profile file, layer 0's exactness,
the donor's text, the request formats and the errors."""

import base64
import contextlib
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from vlcache_sglang import calibrate
from vlcache_sglang.layer_profile import check_profile_matches, load_layer_profile

LAYERS = 3
# hidden 64, head_dim 32 (mrope_section sums to 16), a one-block vision tower of width 32.
TINY = {"hidden_size": 64, "num_hidden_layers": LAYERS, "num_attention_heads": 2, "num_key_value_heads": 1,
        "intermediate_size": 128, "max_window_layers": LAYERS, "initializer_range": 0.2,
        "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},
        "vision_config": {"depth": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64,
                          "window_size": 112, "fullatt_block_indexes": [0]}}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Config, processor and tokenizer by the project's writer; seeded random weights by transformers."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    from vlcache_sglang.model_dir import write_model_dir

    tok = None
    if os.environ.get("VLCACHE_TEST_MODEL_DIR"):  # hosts without dashscope: reuse its tokenizer
        tok = Path(os.environ["VLCACHE_TEST_MODEL_DIR"]) / "tokenizer.json"
    out = write_model_dir(tmp_path_factory.mktemp("calib") / "tiny-qwen2.5-vl", "3B", TINY,
                          {"min_pixels": 56 * 56, "max_pixels": 84 * 84}, tok)
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(AutoConfig.from_pretrained(out)).float().save_pretrained(out)
    return out


def _png(px: int, colour: tuple[int, int, int]) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(sum(colour) + px)
    arr = (rng.integers(0, 256, (px, px, 3)) // 2 + np.array(colour) // 2).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(px: int, colour) -> str:
    return "data:image/png;base64," + base64.b64encode(_png(px, colour)).decode()


def _chat(system: str, before: str, urls: list[str], after: str) -> dict:
    content = [{"type": "text", "text": before}]
    content += [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    content.append({"type": "text", "text": after})
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": content}],
            "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def requests_file(tmp_path_factory) -> Path:
    """Two image requests (one with two images), a text-only one, and one more that --max-requests 2 leaves out."""
    path = tmp_path_factory.mktemp("req") / "requests.jsonl"
    rows = [_chat("chart revenue quarter screenshot button", "How many red cells are there in",
                  [_data_url(56, (200, 20, 20))], "Question: what trend?"),
            _chat("product photo colour shelf", "Compare these two pictures",
                  [_data_url(84, (20, 200, 20)), _data_url(56, (20, 20, 200))], "Answer:"),
            {"messages": [{"role": "user", "content": "no image here"}]},
            _chat("left out", "by max requests", [_data_url(56, (9, 9, 9))], "?")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def calibrated(tiny_checkpoint, requests_file, tmp_path_factory) -> tuple[Path, str, str]:
    """(profile path, stdout, stderr) of one calibrate run."""
    out = tmp_path_factory.mktemp("out") / "profile.json"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        calibrate.main(["--model", str(tiny_checkpoint), "--requests", str(requests_file), "--out", str(out),
                        "--device", "cpu", "--layer-batch", "2", "--max-requests", "2"])
    print(stdout.getvalue())  # shown with -s: the table of the tiny model
    return out, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def calibrator(tiny_checkpoint) -> calibrate.Calibrator:
    return calibrate.Calibrator(str(tiny_checkpoint), "cpu", torch.float32)


def test_profile_file_loads_with_one_finite_value_per_layer(calibrated, tiny_checkpoint):
    profile = load_layer_profile(calibrated[0])
    assert profile.num_layers == LAYERS
    assert profile.metric == "first_token_kl" and profile.samples == 2 and profile.model == str(tiny_checkpoint)
    assert all(math.isfinite(s) and s >= 0 for s in profile.sensitivity)
    check_profile_matches(profile, LAYERS)
    with pytest.raises(ValueError, match="rerun .*calibrate"):
        check_profile_matches(profile, LAYERS + 1)


def test_layer0_reuse_is_exact_and_deeper_layers_are_not(calibrated):
    """Layer-0 image K/V depend only on the image and its positions; deeper ones see the text."""
    s = load_layer_profile(calibrated[0]).sensitivity
    assert s[0] < 1e-6, s
    assert max(s[1:]) > 1e-4, s


def test_table_and_log(calibrated):
    _, out, err = calibrated
    assert "r_l at mean 0.05" in out
    rows = [l.split() for l in out.splitlines() if l.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == list(range(LAYERS))
    assert sum(float(r[2]) for r in rows) / LAYERS == pytest.approx(0.05, abs=1e-3)
    assert "2 usable requests" in err and "1 without an image skipped" in err


def test_per_request_kl_matches_a_direct_splice(calibrator, requests_file):
    """Batched hooks == one unbatched forward that swaps layer 1's image K/V by hand."""
    reqs, _ = calibrate.load_requests(requests_file)
    cal = calibrator
    enc, mask = cal.encode(reqs[0], *cal.content_tokens(reqs[0]))
    prep = cal.prepare(enc, mask, np.array([9707, 1052, 11]), np.random.default_rng(0))
    donor = calibrate.record_donor_kv(cal.model, prep)
    kls = calibrate.layer_kls(cal.model, prep, donor, layer_batch=1)

    layer = cal.model.model.language_model.layers[1].self_attn

    def swap(which):
        def fn(_m, _i, out):
            out = out.clone()
            out[0, prep.image_mask] = donor[(1, which)]
            return out
        return fn

    hooks = [layer.k_proj.register_forward_hook(swap("k")), layer.v_proj.register_forward_hook(swap("v"))]
    with torch.no_grad():
        spliced = calibrate._last_logits(cal.model, calibrate._embeds(cal.model, prep.target, prep, 1), prep.position_ids)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        full = calibrate._last_logits(cal.model, calibrate._embeds(cal.model, prep.target, prep, 1), prep.position_ids)
    p, q = torch.log_softmax(full.double(), -1)[0], torch.log_softmax(spliced.double(), -1)[0]
    assert kls[1] == pytest.approx(float((p.exp() * (p - q)).sum()), rel=1e-3, abs=1e-9)
    # The donor changed only content text before the image: same length, same image positions.
    ids, d = prep.target.numpy(), prep.donor.numpy()
    changed = np.nonzero(ids != d)[0]
    assert len(changed) and set(changed) <= set(np.nonzero(mask)[0])
    assert changed.max() < np.nonzero(ids == cal.image_token_id)[0].min()


def test_content_mask_spares_template_tokens(calibrator, requests_file):
    reqs, _ = calibrate.load_requests(requests_file)
    cal = calibrator
    enc, mask = cal.encode(reqs[0], *cal.content_tokens(reqs[0]))
    ids = enc["input_ids"][0].numpy()
    first_image = int(np.nonzero(ids == 151655)[0].min())
    decode = cal.processor.tokenizer.decode
    assert decode(ids[mask]).split() == "chart revenue quarter screenshot buttonHow many red cells are there in".split()
    # Template tokens (role names, <|im_start|>, newlines, the vision start) are left as they are.
    kept = decode(ids[:first_image][~mask[:first_image]])
    assert kept == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n<|vision_start|>"


# ----- request files (no model) -------------------------------------------------------------------

def test_accuracy_dataset_records_and_file_paths(tmp_path):
    (tmp_path / "img.png").write_bytes(_png(56, (1, 2, 3)))
    rows = [{"id": "a", "prompt": "Earlier chat.\nHow many red?<image>Answer:", "images": ["img.png"],
             "answer": "3", "system": "Be brief."},
            {"messages": [{"role": "user", "content": "text only"}]}]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    reqs, no_image = calibrate.load_requests(path)
    assert no_image == 1 and len(reqs) == 1
    r = reqs[0]
    assert r.images == [str(tmp_path / "img.png")] and r.line == 1
    assert r.texts_before_image == ["Be brief.", "Earlier chat.\nHow many red?"]
    assert r.messages[1]["content"] == [{"type": "text", "text": "Earlier chat.\nHow many red?"}, {"type": "image"},
                                        {"type": "text", "text": "Answer:"}]


def test_no_request_with_an_image_is_a_clear_error(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(SystemExit, match="none of the requests .* has an image"):
        calibrate.main(["--model", str(tmp_path), "--requests", str(path), "--out", str(tmp_path / "p.json")])
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("line, match", [
    ("{not json", "line 1: not JSON"),
    (json.dumps({"foo": 1}), "expected an object with 'messages'"),
    (json.dumps(_chat("s", "t", ["https://example.com/a.png"], "q")), "does not download"),
    (json.dumps(_chat("s", "t", ["missing.png"], "q")), "image file not found"),
    (json.dumps({"prompt": "a <image> b <image>", "images": ["x.png"]}), "2 <image> marker"),
])
def test_bad_request_lines_name_the_line(tmp_path, line, match):
    path = tmp_path / "r.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=match):
        calibrate.load_requests(path)


def test_donor_ids_window_and_fallback():
    ids = np.array([1, 5, 6, 7, 2, 9])
    mask = np.array([False, True, True, True, False, False])
    out = calibrate.donor_ids(ids, mask, np.array([10, 11]), np.random.default_rng(0), 100)
    assert len(out) == len(ids) and (out[~mask] == ids[~mask]).all() and set(out[mask]) <= {10, 11}
    forced = calibrate.donor_ids(np.array([3, 3]), np.array([True, True]), np.array([3]), np.random.default_rng(0), 100)
    assert not np.array_equal(forced, [3, 3])  # the pool can only give the same text: random tokens
