"""compression_sim: its attention equals the model's own, alpha 1 equals no compression, the mask reaches
only the decode rows, the answer's image tokens are the right ones, and the report has every selection."""

import numpy as np
import pytest
import torch

from benchmarks.tiny_vlm.batches import TaskConfig, answer_logits, load_tokenizer, make_batch
from benchmarks.tiny_vlm.compression_sim import (SELECTIONS, TAIL, Rules, answer_tokens, batch_layout,
                                                 kept_masks, kept_sets, row_target, score_answers, sim_attention,
                                                 simulate)
from benchmarks.tiny_vlm.make_eval import compression_samples, image_wide_samples, row_samples
from benchmarks.tiny_vlm.prompts import VISION_END, image_runs


@pytest.fixture(scope="module")
def task(spec) -> TaskConfig:
    return TaskConfig(spec=spec, max_filler_words=8, layouts=(("mrow", 1.0),), row_images=3)


@pytest.fixture(scope="module")
def batch(tiny_dir, task):
    tok = load_tokenizer(tiny_dir)
    return make_batch(row_samples(task, 4, seed=3, row_images=3), tok, task.spec, [0.5] * 3, [0.25] * 3, "cpu")


def observe(model, batch, spec):
    with sim_attention(model) as sim:
        sim.layout = batch_layout(batch, spec)
        sim.observed = {}
        logits = answer_logits(model, batch)
        return sim, sim.observed, logits


def test_row_target_reads_row_questions_only() -> None:
    assert row_target("What are the colours of row 3 of image 2, left to right?") == (3, 2)
    assert row_target("What are the colours of row 3, left to right?") == (3, 1)
    with pytest.raises(ValueError, match="not a row question"):
        row_target("How many red cells are there?")


@pytest.mark.parametrize("kind", ["counts", "present"])
def test_image_wide_questions_read_the_coloured_cells(tiny_dir, spec, kind) -> None:
    task = TaskConfig(spec=spec, max_filler_words=8, layouts=(("b", 1.0),), b_weights=((kind, 1.0),))
    samples = image_wide_samples(task, kind, 6, seed=1)
    assert {s.question.kind for s in samples} == {kind}
    assert ([s.question.answer for s in compression_samples(task, 6)]
            == [s.question.answer for s in image_wide_samples(task, kind, 6)])
    tok = load_tokenizer(tiny_dir)
    b = make_batch(samples, tok, spec, [0.5] * 3, [0.25] * 3, "cpu")
    layout = batch_layout(b, spec)
    for r, s in enumerate(samples):
        runs = image_runs(b.input_ids[r, :layout.prompt_len[r]].tolist())
        keys = layout.key_tokens[r]
        assert keys == answer_tokens(s, runs, spec) and len(keys) == int((s.grid != 0).sum())
        assert all(runs[0][0] <= k < runs[0][1] for k in keys)
        # The answer is read from exactly those cells: the counts (or the colours present) in palette order.
        held = s.grid.ravel()[[k - runs[0][0] for k in keys]]
        counts = [int((held == i + 1).sum()) for i in range(len(spec.colours))]
        if kind == "counts":
            assert s.question.answer == " ".join(map(str, counts))
        else:
            assert s.question.answer == (" ".join(c for c, n in zip(spec.colours, counts) if n) or "none")


def test_cells_of_several_tokens_are_read_from_their_pixels(tiny_dir) -> None:
    """56-px cells (present2x): each cell is 2 x 2 merged tokens, and the key tokens are exactly the ones
    whose four patches (the vision tower's pixel_values, 2 x 2 merge order) show a coloured cell."""
    import json

    from benchmarks.tiny_vlm.compression_sim import cell_tokens
    from benchmarks.tiny_vlm.grid_task import BACKGROUND, RGB, GridSpec
    from benchmarks.tiny_vlm.pixels import MERGE, tokens_per_image

    spec = GridSpec(cells=4, colours=("red", "green", "blue"), max_count=3, cell_px=56)
    assert cell_tokens([0, 5], spec) == [0, 1, 8, 9, 18, 19, 26, 27]  # 8 tokens a row; cell 5 = (1, 1)
    task = TaskConfig(spec=spec, max_filler_words=8, layouts=(("b", 1.0),), b_weights=(("present", 1.0),))
    samples = image_wide_samples(task, "present", 4, seed=2)
    pre = json.loads((tiny_dir / "preprocessor_config.json").read_text())
    b = make_batch(samples, load_tokenizer(tiny_dir), spec, pre["image_mean"], pre["image_std"], "cpu")
    n = tokens_per_image(spec)
    patches = b.pixel_values.reshape(len(samples), n, MERGE * MERGE, 3, -1)  # [B, token, patch, rgb, px]
    mean, std = torch.tensor(pre["image_mean"]) * 255, torch.tensor(pre["image_std"]) * 255
    background = (torch.tensor(RGB[BACKGROUND], dtype=torch.float32) - mean) / std
    for r, s in enumerate(samples):
        runs = image_runs(b.input_ids[r].tolist())
        assert runs[0][1] - runs[0][0] == n == 64
        keys = [k - runs[0][0] for k in answer_tokens(s, runs, spec)]
        assert len(keys) == 4 * int((s.grid != 0).sum()) > 0
        shown = patches[r].mean(dim=(1, 3))  # [token, rgb]: the mean colour of its four patches
        coloured = [t for t in range(n) if not torch.allclose(shown[t], background, atol=1e-4)]
        assert keys == coloured


def test_layout_names_the_asked_row_and_the_post_vision_voters(batch, spec) -> None:
    layout = batch_layout(batch, spec)
    for r, sample in enumerate(batch.samples):
        ids = batch.input_ids[r].tolist()
        m = layout.prompt_len[r]
        runs = image_runs(ids[:m])
        assert ids[layout.voter_start[r]] == VISION_END and layout.voter_start[r] == runs[-1][1]
        row, image = row_target(sample.question.text)
        start, end = runs[image - 1]
        assert layout.key_tokens[r] == list(range(start + (row - 1) * spec.cells, start + row * spec.cells))
        assert layout.key_tokens[r][-1] < end
        # The answer and <|im_end|> follow the prompt.
        assert layout.seq_len[r] - m == int((batch.target_sample == r).sum())


def test_sim_attention_equals_the_models_own_and_observes_probabilities(tiny_model, batch, spec) -> None:
    stock = answer_logits(tiny_model, batch)
    sim, observed, logits = observe(tiny_model, batch, spec)
    torch.testing.assert_close(logits, stock, atol=2e-5, rtol=1e-4)
    layout = sim.layout
    assert sorted(observed) == list(range(tiny_model.config.text_config.num_hidden_layers))
    heads = tiny_model.config.text_config.num_attention_heads
    for per_request in observed.values():
        for r, o in enumerate(per_request):
            m, v0 = layout.prompt_len[r], layout.voter_start[r]
            # Every voter row is a distribution over the prompt: the scores sum to heads x tau.
            assert o.scores.shape == (m,) and float(o.scores.sum()) == pytest.approx(heads * (m - v0), rel=1e-6)
            # The decode rows' prompt mass is below one per row (they also attend to the answer so far).
            decode_rows = layout.seq_len[r] - 1 - m
            assert 0 < float(o.decode_mass.sum()) <= heads * decode_rows + 1e-6
            assert 0.0 <= o.sparsity < 1.0


def test_alpha_one_keeps_everything_and_equals_full(tiny_model, batch, spec) -> None:
    sim, observed, full = observe(tiny_model, batch, spec)
    rng = np.random.default_rng(0)
    with sim_attention(tiny_model) as again:
        again.layout = sim.layout
        for selection in SELECTIONS:
            sets = kept_sets(observed, sim.layout, selection, 1.0, rng)
            assert all(len(k) == m for per, m in zip(sets, sim.layout.prompt_len) for k in per)
            again.kept = kept_masks(sets, batch.input_ids.shape[1], "cpu")
            torch.testing.assert_close(answer_logits(tiny_model, batch), full, atol=0, rtol=0)


def test_compression_changes_decode_rows_only(tiny_model, batch, spec) -> None:
    sim, observed, full = observe(tiny_model, batch, spec)
    sets = kept_sets(observed, sim.layout, "vlcache", 0.05, np.random.default_rng(0))
    tails = [m - v0 for m, v0 in zip(sim.layout.prompt_len, sim.layout.voter_start)]
    assert all(len(k) < m and len(k) >= t for per, m, t in zip(sets, sim.layout.prompt_len, tails) for k in per)
    with sim_attention(tiny_model) as again:
        again.layout = sim.layout
        again.kept = kept_masks(sets, batch.input_ids.shape[1], "cpu")
        trimmed = answer_logits(tiny_model, batch)
    first = torch.tensor([list(batch.target_sample.tolist()).index(r) for r in range(len(batch.samples))])
    # The first answer token comes from the prefill's last row: untouched by the decode mask.
    torch.testing.assert_close(trimmed[first], full[first], atol=1e-5, rtol=1e-5)
    later = torch.ones(len(full), dtype=torch.bool)
    later[first] = False
    assert not torch.allclose(trimmed[later], full[later], atol=1e-4)


def test_score_answers_counts_exact_and_cells(batch) -> None:
    logits = torch.zeros(len(batch.targets), int(batch.targets.max()) + 2)
    logits[torch.arange(len(batch.targets)), batch.targets] = 1.0
    wrong = int((batch.target_sample == 1).nonzero()[0])
    logits[wrong] = 0.0
    logits[wrong, -1] = 1.0
    exact, cells = score_answers(logits, batch)
    n1 = int((batch.target_sample == 1).sum())
    assert exact.tolist() == [True, False, True, True]
    assert cells[1] == pytest.approx((n1 - 1) / n1) and cells[0] == 1.0


def test_compression_samples_follow_the_checkpoints_task(spec) -> None:
    rows = TaskConfig(spec=spec, layouts=(("mrow", 1.0),), row_images=3)
    assert [len(s.grids) for s in compression_samples(rows, 2)] == [3, 3]
    assert [s.kind for s in compression_samples(rows, 2)] == [s.kind for s in row_samples(rows, 2, row_images=3)]
    with pytest.raises(SystemExit, match="no compression task"):
        compression_samples(TaskConfig(spec=spec), 2)


@pytest.mark.parametrize("task_flags, kind", [(["--layouts", "mrow:1", "--row-images", "2"], "mrow.row"),
                                              (["--layouts", "b:1", "--kinds-b", "counts:1"], "b.counts")])
def test_simulate_reports_every_selection_at_every_alpha(tiny_dir, tmp_path, task_flags, kind) -> None:
    """End to end on a 2-step checkpoint of each task: chance-level numbers, the report's shape and anchors."""
    from benchmarks.tiny_vlm.train import parse_args, train

    out = tmp_path / "ckpt"
    train(parse_args(["--out", str(out), "--size", "small", "--layers", "2", "--cells", "4", "--colours", "3",
                      "--max-count", "3", *task_flags, "--batch", "4",
                      "--held-out", "4", "--max-steps", "2", "--tokenizer-from", str(tiny_dir), "--device", "cpu"]))
    report = simulate(out, requests=6, alphas=[1.0, 0.2], device="cpu", batch_size=4)
    assert report["kind"] == kind and 0 < report["answer_prior"] <= 1
    from benchmarks.tiny_vlm.compression_sim import table
    full = next(r["exact"] for r in report["rows"] if r["selection"] == "full")
    assert ("does not clear the answer prior" in table(report)) == (full <= report["answer_prior"] + 0.02)
    assert "does not clear" not in table({**report, "answer_prior": full - 0.5})
    rows = {(r["selection"], r["alpha"]): r for r in report["rows"]}
    assert set(rows) == {("full", 1.0), (TAIL, 0.0)} | {(s, a) for s in SELECTIONS for a in (1.0, 0.2)}
    assert all(r["n"] == 6 for r in rows.values()) and len(report["sparsity_per_layer"]) == 2
    for s in SELECTIONS:
        assert rows[(s, 1.0)]["exact"] == rows[("full", 1.0)]["exact"]
        assert rows[(s, 1.0)]["decode_recall"] == pytest.approx(1.0) and rows[(s, 1.0)]["key_recall"] == 1.0
    # The oracle keeps the decode queries' own top tokens: no selection with its counts holds more mass.
    for s in ("vlcache", "random"):
        assert rows[("oracle", 0.2)]["decode_recall"] >= rows[(s, 0.2)]["decode_recall"] - 1e-9
    # The tail alone keeps nothing before the post-vision queries; the full cache keeps the first token.
    assert np.isnan(rows[(TAIL, 0.0)]["image_share"]) and rows[(TAIL, 0.0)]["first_kept"] == 0.0
    assert rows[("full", 1.0)]["first_kept"] == 1.0 and 0 < rows[("full", 1.0)]["image_share"] < 1


def test_the_tail_selection_keeps_the_post_vision_queries_alone(tiny_model, batch, spec) -> None:
    sim, observed, _ = observe(tiny_model, batch, spec)
    sets = kept_sets(observed, sim.layout, TAIL, 0.0, np.random.default_rng(0))
    for per_layer, m, v0 in zip(sets, sim.layout.prompt_len, sim.layout.voter_start):
        assert all(k.tolist() == list(range(v0, m)) for k in per_layer)


def test_sinks_and_the_layer_cap_follow_the_servers_rules(tiny_model, batch, spec) -> None:
    """Sinks: the first S prompt tokens at every layer, inside the count (compressor.run's min_keep); the
    cap: no layer keeps more than max_budget of the prompt beyond what the tail and sinks force."""
    import math

    sim, observed, _ = observe(tiny_model, batch, spec)
    rng = np.random.default_rng(0)
    plain = kept_sets(observed, sim.layout, "vlcache", 0.2, rng)
    sinks = kept_sets(observed, sim.layout, "vlcache", 0.2, rng, Rules(sink_tokens=4))
    capped = kept_sets(observed, sim.layout, "vlcache", 0.5, rng, Rules(max_budget=0.55))
    for r, (m, v0) in enumerate(zip(sim.layout.prompt_len, sim.layout.voter_start)):
        for a, b, c in zip(plain[r], sinks[r], capped[r]):
            assert b[:4].tolist() == [0, 1, 2, 3] and len(b) == max(len(a), m - v0 + 4)
            assert len(c) <= max(math.floor(0.55 * m + 1e-9), m - v0)
    with pytest.raises(ValueError):
        kept_sets(observed, sim.layout, "vlcache", 0.2, rng, Rules(max_budget=0.0))
    # A uniform share of 1 makes vlcache's counts uniform's (the server's layer_budgets, one function).
    shared = kept_sets(observed, sim.layout, "vlcache", 0.2, rng, Rules(uniform_share=1.0))
    uniform = kept_sets(observed, sim.layout, "uniform", 0.2, rng)
    assert [[len(k) for k in per] for per in shared] == [[len(k) for k in per] for per in uniform]
    # alpha 1 plans nothing on the server, cap or no cap: every selection keeps the whole prompt.
    for selection in SELECTIONS:
        whole = kept_sets(observed, sim.layout, selection, 1.0, rng, Rules(sink_tokens=4, max_budget=0.3))
        assert all(len(k) == m for per, m in zip(whole, sim.layout.prompt_len) for k in per)
