"""Layout mrow: layout b's context, K labelled images, a row question naming one of them after them all."""

import re

import numpy as np
import pytest

from benchmarks.tiny_vlm import prompts
from benchmarks.tiny_vlm.batches import (TaskConfig, encode, layout_mrow_sample, load_tokenizer, make_batch,
                                         random_samples)
from benchmarks.tiny_vlm.grid_task import GridSpec, random_grids

BENCH = TaskConfig(spec=GridSpec(), layouts=(("mrow", 1.0),), row_images=4)  # compression_bench's: 8x8 cells
TAIL = "What are the colours of row {r} of image {i}, left to right?\nAnswer:<|im_end|>\n<|im_start|>assistant\n"


def _asked(sample) -> tuple[int, int]:
    """(row, image) the question names."""
    r, i = re.fullmatch(r"What are the colours of row (\d) of image (\d), left to right\?", sample.question.text).groups()
    return int(r), int(i)


def test_k_labelled_images_after_the_context_and_the_question_after_them_all(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    rng = np.random.default_rng(0)
    lengths = []
    for _ in range(64):
        sample = layout_mrow_sample(list(random_grids(BENCH.spec, 4, rng)), BENCH, rng)
        prompt, answer = encode(tok, BENCH.spec, sample)
        runs = prompts.image_runs(prompt)
        assert [e - s for s, e in runs] == [64] * 4
        for n, (s, _) in enumerate(runs, start=1):  # each image after its label, the first after the context
            assert tok.decode(prompt[s - 5:s], skip_special_tokens=False).endswith(f"Image {n}:<|vision_start|>")
        head = tok.decode(prompt[:runs[0][0]], skip_special_tokens=False)
        assert head.startswith(f"<|im_start|>system\n{sample.system}<|im_end|>\n") and head.endswith("<|im_start|>user\nImage 1:<|vision_start|>")
        row, image = _asked(sample)
        tail = prompt[runs[-1][1]:]
        assert tok.decode(tail, skip_special_tokens=False) == "<|vision_end|>" + TAIL.format(r=row, i=image)
        assert len(tail) == 25, "the post-vision window every compressed layer keeps"
        assert len(answer) == BENCH.spec.cells + 1 and answer[-1] == prompts.IM_END  # 8 colours + <|im_end|>
        lengths.append(len(prompt))
    # m = context + 4 x (64 pads + vision tags + label) + 25: ~370 tokens, so alpha 0.1 keeps > 25 + 8.
    assert 300 <= min(lengths) and max(lengths) <= 470 and 350 <= np.mean(lengths) <= 390, lengths


def test_the_answer_is_the_named_images_row():
    rng = np.random.default_rng(1)
    named = set()
    for _ in range(200):
        grids = list(random_grids(BENCH.spec, 4, rng))
        sample = layout_mrow_sample(grids, BENCH, rng)
        row, image = _asked(sample)
        assert sample.grids[image - 1] is grids[image - 1] and len(sample.grids) == 4
        assert sample.question.answer.split() == [BENCH.spec.palette[int(c)] for c in grids[image - 1][row - 1]]
        assert sample.kind == "mrow.row" and sample.layout == "mrow"
        named.add(image)
    assert named == {1, 2, 3, 4}


def test_batches_of_mrow_samples(tiny_dir, spec):
    task = TaskConfig(spec=spec, max_filler_words=6, layouts=(("mrow", 1.0),), row_images=3)
    samples = random_samples(task, 2, np.random.default_rng(2))
    batch = make_batch(samples, load_tokenizer(tiny_dir), spec, [0.5] * 3, [0.5] * 3, "cpu")
    n = spec.cells ** 2
    assert [len(s.grids) for s in samples] == [3, 3] and batch.image_grid_thw.shape[0] == 6
    assert batch.pixel_values.shape[0] == 6 * n * 4  # 4 patches per merged token
    assert batch.targets.shape[0] == 2 * (spec.cells + 1)  # the row's colours and <|im_end|>, per sample
    for b in range(2):
        seq = batch.input_ids[b].tolist()
        runs = prompts.image_runs(seq)
        pos = batch.position_ids[:, b].numpy()
        # M-RoPE as for layout multi: each image at its own offset, the next one's text after it
        assert len(runs) == 3 and all(pos[0, s] == pos[0, e - 1] for s, e in runs)
        assert pos[0, runs[1][0]] > pos[0, runs[0][1] - 1] + 1


def test_row_images_is_saved_with_the_task_and_checked(tmp_path):
    TaskConfig(layouts=(("mrow", 1.0),), row_images=6).save(tmp_path)
    assert TaskConfig.load(tmp_path).row_images == 6 and TaskConfig.load(tmp_path).layouts == (("mrow", 1.0),)
    for k in (1, 7):
        with pytest.raises(ValueError, match="row_images must be 2..6"):
            TaskConfig(row_images=k)


def test_what_the_server_renders_for_an_mrow_record_is_what_training_encodes(tiny_dir):
    """accuracy.py's messages for a make_eval record (label, image, ..., question) through the checkpoint's
    chat template, as SGLang renders them, give the text batches.encode trains on."""
    import sys
    from pathlib import Path

    from transformers import AutoTokenizer

    from benchmarks.tiny_vlm.make_eval import row_records
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
    import accuracy

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    task = TaskConfig(spec=GridSpec(cells=4, colours=("red", "green"), max_count=3), layouts=(("mrow", 1.0),),
                      row_images=3)
    for r in row_records(task, 4, seed=9, row_images=3):
        served = tok.apply_chat_template(accuracy.parse_record(r, Path(".")).messages(), add_generation_prompt=True,
                                         tokenize=False)
        history = [(t["role"], t["content"]) for t in r.get("history", [])]
        assert served == prompts.render_messages(r.get("system"), history, r["prompt"].split(prompts.IMAGE_MARKER))
        assert served.count("<|vision_start|><|image_pad|><|vision_end|>") == 3
