"""Spliced image K/V: a no-op when the source request is the same text, a change when it is not."""

import dataclasses

import numpy as np
import pytest
import torch

from benchmarks.tiny_vlm.batches import Sample, answer_logits, make_batch, load_tokenizer
from benchmarks.tiny_vlm.grid_task import count_question, random_grids
from benchmarks.tiny_vlm.kv_splice import record_image_kv, splice_image_kv

MEAN, STD = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]


def _batches(tiny_dir, spec, colour_a, colour_b, filler_b="Some earlier chat."):
    tok = load_tokenizer(tiny_dir)
    grids = random_grids(spec, 2, np.random.default_rng(0))
    mk = lambda colour, filler: make_batch(  # noqa: E731
        [Sample(g, count_question(g, spec, colour), filler) for g in grids], tok, spec, MEAN, STD, "cpu")
    return mk(colour_a, "Some earlier chat."), mk(colour_b, filler_b)


def _logits(model, batch, store=None, keep_first=0, n=16):
    with torch.no_grad():
        if store is None:
            return answer_logits(model, batch)
        with splice_image_kv(model, batch.image_start, n, store, keep_first):
            return answer_logits(model, batch)


def _record(model, batch, n=16):
    store = {}
    with torch.no_grad(), record_image_kv(model, batch.image_start, n, store):
        answer_logits(model, batch)
    return store


def test_same_request_as_source_changes_nothing(tiny_dir, tiny_model, spec):
    a, _ = _batches(tiny_dir, spec, "red", "red")
    store = _record(tiny_model, a)
    assert len(store) == 2 * tiny_model.config.text_config.num_hidden_layers
    torch.testing.assert_close(_logits(tiny_model, a, store), _logits(tiny_model, a), atol=1e-5, rtol=0)


def test_other_question_as_source_changes_the_answer_logits(tiny_dir, tiny_model, spec):
    a, b = _batches(tiny_dir, spec, "red", "blue")
    assert torch.equal(a.image_start, b.image_start)
    store = _record(tiny_model, a)
    full, none = _logits(tiny_model, b), _logits(tiny_model, b, store)
    assert (full - none).abs().max() > 1e-4
    # Keeping every image token fresh is full recomputation again.
    torch.testing.assert_close(_logits(tiny_model, b, store, keep_first=16), full, atol=1e-5, rtol=0)


def test_layer0_keys_of_the_image_do_not_depend_on_the_text_before(tiny_dir, tiny_model, spec):
    """Layer 0's K/V of an image token is a function of its embedding and position only; deeper
    layers see the text before it. This is what makes reuse after other text inexact."""
    a, b = _batches(tiny_dir, spec, "red", "blue")
    sa, sb = _record(tiny_model, a), _record(tiny_model, b)
    torch.testing.assert_close(sa[(0, "k")], sb[(0, "k")], atol=1e-5, rtol=0)
    assert (sa[(1, "k")] - sb[(1, "k")]).abs().max() > 1e-4


def test_keep_first_out_of_range_is_an_error(tiny_dir, tiny_model, spec):
    a, _ = _batches(tiny_dir, spec, "red", "red")
    with pytest.raises(ValueError, match="keep_first"):
        with splice_image_kv(tiny_model, a.image_start, 16, {}, keep_first=17):
            pass


def test_with_the_route_mask_the_question_reaches_the_answer_only_through_the_image(tiny_dir, tiny_model, spec):
    """Routed request B with request A's image K/V answers exactly like routed A: the tokens after
    the image see no user text, so the mask is applied and the image is the only path."""
    tok = load_tokenizer(tiny_dir)
    grids = random_grids(spec, 2, np.random.default_rng(3))
    routed = np.ones(2, dtype=bool)

    def mk(colour, filler):
        samples = [Sample(g, count_question(g, spec, colour), filler) for g in grids]
        return make_batch(samples, tok, spec, MEAN, STD, "cpu", routed=routed)

    a, b = mk("red", "Earlier text one."), mk("blue", "Other words two.")
    assert torch.equal(a.image_start, b.image_start)
    store = _record(tiny_model, a)

    def first(batch):  # each sample's first answer target (later ones see the answer tokens)
        ts = batch.target_sample
        return torch.cat([torch.tensor([True]), ts[1:] != ts[:-1]]).nonzero().flatten()

    la = _logits(tiny_model, a)[first(a)]
    lb_spliced = _logits(tiny_model, b, store)[first(b)]
    torch.testing.assert_close(lb_spliced, la, atol=1e-5, rtol=0)
    assert (_logits(tiny_model, b)[first(b)] - la).abs().max() > 1e-4
