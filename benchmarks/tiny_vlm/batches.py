"""Training and evaluation batches: token ids, M-RoPE positions, pixel values and answer targets.

A sample is (images, question, context) in one of four layouts (`LAYOUTS`):
- `a`: filler + question, then the image, then "Answer:" (the question is before the image);
- `b`: a system prompt and earlier chat turns, then the image, then question + "Answer:" (the common
  chat case; a `ref` question needs a colour named in the context before the image);
- `multi`: filler + a question about all images, then 2-4 images, then "Answer:";
- `mrow`: layout b's context, then `row_images` labelled images, then a row question naming one of them
  (regime R with several images: a prompt of many image tokens, the question after all of them).
Its sequence is the chat prompt SGLang renders followed by the answer and <|im_end|>; the loss and the
accuracy look only at the answer tokens and <|im_end|> (predicting <|im_end|> is what makes the server
stop after the answer).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from benchmarks.tiny_vlm import prompts
from benchmarks.tiny_vlm.grid_task import (GridSpec, Question, favourite_count_question, random_grids,
                                           random_question, row_question, total_question)
from benchmarks.tiny_vlm.pixels import MERGE, grid_pixel_values, grid_thw, tokens_per_image

TASK_FILE = "tiny_vlm_task.json"  # beside the checkpoint: the task it was trained on
LAYOUTS = ("a", "b", "multi", "mrow")
B_KINDS = ("count", "cell", "most", "ref", "row", "counts", "present")
# Layout mrow's image count: 2 is the smallest "which image" question; at 6 (8x8 cells, prompts of
# ~510 tokens, 25 of them after the last image) alpha 0.1 already keeps twice the post-vision window.
ROW_IMAGES = (2, 6)
NO_FAVOURITE_P = 0.3  # layouts b and mrow: share of contexts (apart from `ref`) that name no favourite colour


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """What the model is trained and evaluated on; saved with the checkpoint."""

    spec: GridSpec = GridSpec()
    weights: tuple[tuple[str, float], ...] = (("count", 0.7), ("cell", 0.2), ("most", 0.1))  # layout a
    max_filler_words: int = 32
    layouts: tuple[tuple[str, float], ...] = (("a", 1.0),)  # share of samples per layout
    b_weights: tuple[tuple[str, float], ...] = (("count", 0.25), ("cell", 0.15), ("most", 0.1), ("ref", 0.5))
    multi_images: tuple[int, int] = (2, 4)  # fewest, most images of a multi sample
    multi_max_count: int = 2  # most cells of one colour per image in multi samples (totals stay one digit)
    row_images: int = 4  # images of an mrow sample

    def __post_init__(self) -> None:
        bad = [k for k, _ in self.layouts if k not in LAYOUTS] + [k for k, _ in self.b_weights if k not in B_KINDS]
        if bad:
            raise ValueError(f"unknown layouts / b kinds {bad}; layouts: {LAYOUTS}, b kinds: {B_KINDS}")
        lo, hi = self.multi_images
        if not 1 <= lo <= hi or hi * self.multi_max_count > 9:
            raise ValueError(f"multi_images {self.multi_images} x multi_max_count {self.multi_max_count}: totals "
                             "must stay one digit (most images x most count <= 9) and 1 <= fewest <= most")
        if not ROW_IMAGES[0] <= self.row_images <= ROW_IMAGES[1]:
            raise ValueError(f"row_images must be {ROW_IMAGES[0]}..{ROW_IMAGES[1]}, got {self.row_images}")

    @property
    def multi_spec(self) -> GridSpec:
        return dataclasses.replace(self.spec, max_count=self.multi_max_count)

    def save(self, model_dir: str | Path) -> None:
        d = dataclasses.asdict(self)
        (Path(model_dir) / TASK_FILE).write_text(json.dumps(d, indent=2) + "\n")

    @classmethod
    def load(cls, model_dir: str | Path) -> "TaskConfig":
        """Checkpoints from before the layouts load as layout `a` only."""
        path = Path(model_dir) / TASK_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} missing: {model_dir} was not written by tiny_vlm.train")
        d = json.loads(path.read_text())
        spec = GridSpec(**{**d["spec"], "colours": tuple(d["spec"]["colours"])})
        pairs = lambda v: tuple((k, float(w)) for k, w in v)  # noqa: E731
        extra = {}
        for name in ("layouts", "b_weights"):
            if name in d:
                extra[name] = pairs(d[name])
        if "multi_images" in d:
            extra["multi_images"] = tuple(int(x) for x in d["multi_images"])
        for name in ("multi_max_count", "row_images"):
            if name in d:
                extra[name] = int(d[name])
        return cls(spec, pairs(d["weights"]), int(d["max_filler_words"]), **extra)

    def layout_share(self, layout: str) -> float:
        total = sum(w for _, w in self.layouts)
        return dict(self.layouts).get(layout, 0.0) / total if total else 0.0


@dataclasses.dataclass(frozen=True)
class Sample:
    grid: np.ndarray  # [cells, cells] palette indices: the (first) image
    question: Question
    filler: str  # layouts a and multi: text before the question
    layout: str = "a"
    system: str | None = None  # layouts b and mrow: the system prompt (None: the template's default)
    history: tuple[tuple[str, str], ...] = ()  # layouts b and mrow: earlier (role, text) turns
    more_grids: tuple[np.ndarray, ...] = ()  # layouts multi and mrow: the images after the first

    @property
    def grids(self) -> tuple[np.ndarray, ...]:
        return (self.grid, *self.more_grids)

    @property
    def kind(self) -> str:
        """The question kind, prefixed by the layout outside layout a (`count`, `b.ref`, `multi.total`)."""
        return self.question.kind if self.layout == "a" else f"{self.layout}.{self.question.kind}"

    def parts(self) -> tuple[str, ...]:
        """The user turn's text pieces, an image between each two (prompts.render_messages)."""
        if self.layout == "b":
            return "", f"{self.question.text}\n{prompts.ANSWER_CUE}"
        if self.layout == "mrow":
            return (*prompts.image_labels(len(self.grids)), f"{self.question.text}\n{prompts.ANSWER_CUE}")
        before, after = prompts.user_text(self.filler, self.question.text)
        return (before, *[""] * len(self.more_grids), after)

    def dataset_prompt(self) -> str:
        """accuracy.py's form: the parts joined by `<image>` markers."""
        return prompts.IMAGE_MARKER.join(self.parts())


@dataclasses.dataclass
class Batch:
    input_ids: torch.Tensor     # [B, L], right-padded with PAD_ID
    position_ids: torch.Tensor  # [3, B, L]
    pixel_values: torch.Tensor  # [images * patches, 1176], images in sample order
    image_grid_thw: torch.Tensor  # [images, 3]
    target_pos: torch.Tensor    # [N] flat index b * L + t of the position that predicts targets[i]
    targets: torch.Tensor       # [N] answer token ids and <|im_end|>
    target_sample: torch.Tensor  # [N] which sample each target belongs to
    image_start: torch.Tensor   # [B] index of the first image token
    samples: list[Sample]
    attention_mask: torch.Tensor | None = None  # [B, 1, L, L] bool (True: may attend), see route_mask


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))


def _draw(weights: tuple[tuple[str, float], ...], rng: np.random.Generator) -> str:
    names = [k for k, w in weights if w > 0]
    if not names:
        raise ValueError(f"no positive weight in {weights}")
    p = np.array([w for k, w in weights if w > 0], dtype=float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def layout_a_sample(grid: np.ndarray, task: TaskConfig, rng: np.random.Generator) -> Sample:
    return Sample(grid, random_question(grid, task.spec, rng, dict(task.weights)),
                  prompts.filler_text(rng, task.max_filler_words))


def layout_b_sample(grid: np.ndarray, task: TaskConfig, rng: np.random.Generator,
                    kind: str | None = None) -> Sample:
    """System prompt and earlier turns before the image, the question after it. Most contexts name a
    favourite colour (so its mention is no hint of the question); a `ref` question asks about it."""
    spec = task.spec
    kind = kind or _draw(task.b_weights, rng)
    favourite = _random_colour(spec, rng)
    if kind == "ref":
        return _chat_sample((grid,), favourite_count_question(grid, spec, favourite), task, rng, favourite)
    question = random_question(grid, spec, rng, {kind: 1.0})
    return _chat_sample((grid,), question, task, rng, _maybe_unnamed(favourite, rng))


def layout_mrow_sample(grids: list[np.ndarray] | tuple, task: TaskConfig, rng: np.random.Generator) -> Sample:
    """Layout b's context before all `grids`, then a row question naming one of them by its ordinal:
    the answer reads `cells` tokens of one image among many (regime R with several images)."""
    image = int(rng.integers(len(grids)))
    question = row_question(grids[image], task.spec, int(rng.integers(1, task.spec.cells + 1)), image + 1)
    favourite = _maybe_unnamed(_random_colour(task.spec, rng), rng)
    return _chat_sample(grids, question, task, rng, favourite, "mrow")


def _random_colour(spec: GridSpec, rng: np.random.Generator) -> str:
    return spec.colours[int(rng.integers(len(spec.colours)))]


def _maybe_unnamed(favourite: str, rng: np.random.Generator) -> str | None:
    """Most contexts name a favourite colour whatever the question, so its mention is no hint of a `ref`."""
    return None if rng.random() < NO_FAVOURITE_P else favourite


def _chat_sample(grids: list[np.ndarray] | tuple, question: Question, task: TaskConfig, rng: np.random.Generator,
                 favourite: str | None, layout: str = "b") -> Sample:
    """Layout b's context (system prompt, earlier turns; `favourite` stated in it unless None) before
    `grids`, `question` after them."""
    system, history = prompts.chat_context(rng, task.max_filler_words, favourite)
    return Sample(grids[0], question, "", layout, system, history, tuple(grids[1:]))


def layout_multi_sample(grids: list[np.ndarray] | tuple, task: TaskConfig, rng: np.random.Generator,
                        filler: str | None = None) -> Sample:
    colour = task.spec.colours[int(rng.integers(len(task.spec.colours)))]
    filler = prompts.filler_text(rng, task.max_filler_words) if filler is None else filler
    return Sample(grids[0], total_question(grids, task.spec, colour), filler, "multi", more_grids=tuple(grids[1:]))


def random_samples(task: TaskConfig, n: int, rng: np.random.Generator) -> list[Sample]:
    """n fresh samples, layouts drawn by task.layouts (layout a alone: the stream of earlier versions)."""
    if tuple(k for k, w in task.layouts if w > 0) == ("a",):
        return [layout_a_sample(g, task, rng) for g in random_grids(task.spec, n, rng)]
    out = []
    for _ in range(n):
        layout = _draw(task.layouts, rng)
        if layout == "multi":
            k = int(rng.integers(task.multi_images[0], task.multi_images[1] + 1))
            out.append(layout_multi_sample(list(random_grids(task.multi_spec, k, rng)), task, rng))
        elif layout == "mrow":
            out.append(layout_mrow_sample(list(random_grids(task.spec, task.row_images, rng)), task, rng))
        else:
            grid = random_grids(task.spec, 1, rng)[0]
            out.append(layout_a_sample(grid, task, rng) if layout == "a" else layout_b_sample(grid, task, rng))
    return out


def encode(tok: Tokenizer, spec: GridSpec, sample: Sample) -> tuple[list[int], list[int]]:
    """(prompt ids with the image pads expanded, answer ids ending in <|im_end|>)."""
    answer = tok.encode(sample.question.answer, add_special_tokens=False).ids + [prompts.IM_END]
    return prompt_ids(tok, spec, sample.system, sample.history, sample.parts()), answer


def prompt_ids(tok: Tokenizer, spec: GridSpec, system: str | None, history: tuple | list,
               parts: tuple[str, ...] | list[str]) -> list[int]:
    """The prompt's token ids as SGLang builds them (prompts.render_messages; one image between each two
    parts, its pad expanded to one token per cell)."""
    ids = tok.encode(prompts.render_messages(system, history, parts), add_special_tokens=False).ids
    return prompts.expand_image_pad(ids, tokens_per_image(spec), len(parts) - 1)


def route_span(seq: list[int], layout: str = "a") -> tuple[int, int, int]:
    """(from, start, end): route_mask hides tokens [start, end) from the tokens at `from` on. `from` is
    the last <|vision_end|>; layouts a and multi hide the user text before the first image (filler,
    question, <|vision_start|>), layout b everything before it after "<|im_start|>system\n" (system
    prompt, earlier turns: where a `ref` question's colour is named)."""
    vs = seq.index(prompts.VISION_START)
    ve = len(seq) - 1 - seq[::-1].index(prompts.VISION_END)
    if layout == "b":
        start = 3  # after "<|im_start|>system\n": the first tokens stay visible (attention sink)
    else:
        start = [i for i, t in enumerate(seq) if t == prompts.IM_START][-2] + 3  # after "<|im_start|>user\n"
    return ve, start, vs + 1


def route_mask(seqs: list[list[int]], length: int, routed: np.ndarray, layouts: list[str] | None = None) -> np.ndarray:
    """[B, 1, L, L] causal mask in which, for the `routed` samples, the tokens from the (last)
    <|vision_end|> on cannot attend to the text before the image (`route_span`).

    Training with it for part of the samples makes the question reach the answer through the image
    tokens' states, as it does in large VLMs, instead of only by the answer attending to the question
    directly; that dependence is what reusing an image's KV after other text gets wrong."""
    mask = np.broadcast_to(np.tril(np.ones((length, length), dtype=bool)), (len(seqs), 1, length, length)).copy()
    for b in np.flatnonzero(routed):
        frm, start, end = route_span(seqs[b], layouts[b] if layouts else "a")
        mask[b, 0, frm:, start:end] = False
    return mask


def make_batch(samples: list[Sample], tok: Tokenizer, spec: GridSpec, image_mean: list[float],
               image_std: list[float], device: str | torch.device, routed: np.ndarray | None = None) -> Batch:
    """routed: [B] bool, samples trained with `route_mask` (None: plain causal attention)."""
    encoded = [encode(tok, spec, s) for s in samples]
    seqs = [p + a for p, a in encoded]
    length = max(map(len, seqs))
    _, gh, gw = grid_thw(spec)
    merged = (gh // MERGE, gw // MERGE)
    ids = np.full((len(seqs), length), prompts.PAD_ID, dtype=np.int64)
    pos = np.zeros((3, len(seqs), length), dtype=np.int64)
    target_pos, targets, target_sample, image_start = [], [], [], []
    for b, ((prompt, answer), seq) in enumerate(zip(encoded, seqs)):
        ids[b, :len(seq)] = seq
        pos[:, b, :len(seq)] = prompts.mrope_positions(seq, merged, len(samples[b].grids))
        for j, t in enumerate(answer):
            target_pos.append(b * length + len(prompt) - 1 + j)
            targets.append(t)
            target_sample.append(b)
        image_start.append(prompt.index(prompts.IMAGE_PAD))
    grids = torch.from_numpy(np.stack([g for s in samples for g in s.grids])).to(device)

    def t(x):
        return torch.as_tensor(np.asarray(x), dtype=torch.long, device=device)

    mask = None
    if routed is not None and routed.any():
        mask = torch.from_numpy(route_mask(seqs, length, routed, [s.layout for s in samples])).to(device)
    return Batch(t(ids), t(pos), grid_pixel_values(grids, spec, image_mean, image_std),
                 t([grid_thw(spec)] * len(grids)), t(target_pos), t(targets), t(target_sample),
                 t(image_start), samples, mask)


def answer_logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """[N, vocab] logits at the target positions only (the full-vocabulary head on every position
    would dominate the step time)."""
    out = model.model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                      attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                      image_grid_thw=batch.image_grid_thw, use_cache=False)
    hidden = out.last_hidden_state.flatten(0, 1)[batch.target_pos]
    return model.lm_head(hidden)


def greedy_correct(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """[B] bool: greedy decoding would produce exactly the answer then <|im_end|> (every target token
    is the argmax given the correct ones before it)."""
    hit = (logits.argmax(-1) == batch.targets).long()
    n = len(batch.samples)
    wrong = torch.zeros(n, dtype=torch.long, device=hit.device).index_add_(0, batch.target_sample, 1 - hit)
    return wrong == 0
