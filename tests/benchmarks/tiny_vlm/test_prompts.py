"""Prompt text and positions are what SGLang builds for the same chat request."""

import numpy as np
import pytest
import torch

from benchmarks.tiny_vlm import prompts
from benchmarks.tiny_vlm.batches import Sample, encode, load_tokenizer
from benchmarks.tiny_vlm.grid_task import count_question, random_grids


@pytest.mark.parametrize("filler", ["", "Some words here. More words."])
def test_render_chat_is_the_checkpoint_template(tiny_dir, filler):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    before, after = prompts.user_text(filler, "How many red cells are there?")
    # What an OpenAI client sends; SGLang renders it with the checkpoint's Jinja template.
    messages = [{"role": "user", "content": [
        {"type": "text", "text": before},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": after}]}]
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompts.render_chat(before, after) == expected
    assert before == before.strip() and after == after.strip()


def test_dataset_prompt_has_one_marker_between_before_and_after():
    before, after = prompts.user_text("Hello there.", "Which colour?")
    p = prompts.dataset_prompt(before, after)
    assert p.count(prompts.IMAGE_MARKER) == 1 and p.split(prompts.IMAGE_MARKER) == [before, after]


def test_filler_lengths_vary_up_to_the_limit():
    rng = np.random.default_rng(0)
    lengths = [len(prompts.filler_text(rng, 20).split()) for _ in range(300)]
    assert min(lengths) == 0 and max(lengths) == 20 and len(set(lengths)) > 10


def test_encode_expands_the_image_pad_and_ends_the_answer(tiny_dir, spec):
    tok = load_tokenizer(tiny_dir)
    grid = random_grids(spec, 1, np.random.default_rng(0))[0]
    prompt, answer = encode(tok, spec, Sample(grid, count_question(grid, spec, "red"), "A day."))
    assert prompt.count(prompts.IMAGE_PAD) == spec.cells ** 2
    i = prompt.index(prompts.IMAGE_PAD)
    assert prompt[i - 1] == prompts.VISION_START and prompt[i + spec.cells ** 2] == prompts.VISION_END
    assert answer[-1] == prompts.IM_END and len(answer) == 2
    assert tok.decode(prompt[-3:], skip_special_tokens=False) == "<|im_start|>assistant\n"


@pytest.mark.parametrize("before_len, h, w, after_len", [(7, 4, 4, 5), (0, 2, 6, 3), (30, 6, 2, 0)])
def test_mrope_positions_match_transformers_get_rope_index(tiny_model, before_len, h, w, after_len):
    ids = [100] * before_len + [prompts.IMAGE_PAD] * (h * w) + [200] * after_len
    t = torch.tensor([ids])
    ours = prompts.mrope_positions(ids, (h, w))
    theirs, _ = tiny_model.model.get_rope_index(t, mm_token_type_ids=(t == prompts.IMAGE_PAD).int(),
                                                image_grid_thw=torch.tensor([[1, 2 * h, 2 * w]]))
    np.testing.assert_array_equal(ours, theirs[:, 0].numpy())


def test_bad_image_runs_are_errors():
    with pytest.raises(ValueError, match="one <"):
        prompts.expand_image_pad([1, 2], 4)
    with pytest.raises(ValueError, match="one run"):
        prompts.mrope_positions([prompts.IMAGE_PAD, 5, prompts.IMAGE_PAD], (1, 2))


def test_mrope_positions_match_sglang_get_rope_index():
    """The positions the server gives the same tokens (SGLang's own M-RoPE index)."""
    from sglang.srt.layers.rotary_embedding import MRotaryEmbedding

    ids = [100] * 9 + [prompts.VISION_START] + [prompts.IMAGE_PAD] * 64 + [prompts.VISION_END] + [200] * 6
    pos, _ = MRotaryEmbedding.get_rope_index(
        spatial_merge_size=2, image_token_id=prompts.IMAGE_PAD, video_token_id=151656,
        vision_start_token_id=prompts.VISION_START, model_type="qwen2_5_vl", tokens_per_second=2,
        input_ids=torch.tensor([ids]), image_grid_thw=torch.tensor([[1, 16, 16]]), video_grid_thw=None)
    np.testing.assert_array_equal(prompts.mrope_positions(ids, (8, 8)), pos[:, 0].numpy())


def test_render_messages_with_system_history_and_several_images_is_the_template(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    img = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    system = "You are a concise assistant. The user's favourite colour is red."
    history = (("user", "Good morning. My favourite colour is blue."), ("assistant", "Hello there."))
    messages = [{"role": "system", "content": system}, *({"role": r, "content": t} for r, t in history),
                {"role": "user", "content": [img, {"type": "text", "text": "How many? Answer:"}]}]
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompts.render_messages(system, history, ("", "How many? Answer:")) == expected
    multi = [{"role": "user", "content": [{"type": "text", "text": "Count."}, img, img, img,
                                          {"type": "text", "text": "Answer:"}]}]
    expected = tok.apply_chat_template(multi, add_generation_prompt=True, tokenize=False)
    assert prompts.render_messages(None, (), ("Count.", "", "", "Answer:")) == expected


def test_chat_context_names_the_favourite_colour_once():
    rng = np.random.default_rng(3)
    for _ in range(50):
        system, history = prompts.chat_context(rng, 10, "green")
        text = " ".join([system] + [t for _, t in history])
        assert text.count("favourite colour is green.") == 1
        assert [r for r, _ in history] == ["user", "assistant"] * (len(history) // 2)
    assert all("favourite" not in prompts.chat_context(rng, 10, None)[0] for _ in range(20))


def test_expand_pads_and_mrope_for_several_images_match_sglang():
    from sglang.srt.layers.rotary_embedding import MRotaryEmbedding

    vs, ve, pad = prompts.VISION_START, prompts.VISION_END, prompts.IMAGE_PAD
    ids = [100] * 5 + [vs, pad, ve, vs, pad, ve] + [200] * 3 + [vs, pad, ve] + [300] * 4
    expanded = prompts.expand_image_pad(ids, 64, n_images=3)
    assert expanded.count(pad) == 192 and len(prompts.image_runs(expanded)) == 3
    pos, _ = MRotaryEmbedding.get_rope_index(
        spatial_merge_size=2, image_token_id=pad, video_token_id=151656, vision_start_token_id=vs,
        model_type="qwen2_5_vl", tokens_per_second=2, input_ids=torch.tensor([expanded]),
        image_grid_thw=torch.tensor([[1, 16, 16]] * 3), video_grid_thw=None)
    np.testing.assert_array_equal(prompts.mrope_positions(expanded, (8, 8), n_images=3), pos[:, 0].numpy())
    with pytest.raises(ValueError, match="expected 3 <"):
        prompts.expand_image_pad(ids[:8], 64, n_images=3)
    with pytest.raises(ValueError, match="expected 2 image"):
        prompts.mrope_positions(expanded, (8, 8), n_images=2)
