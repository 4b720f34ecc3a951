"""Training and evaluation batches: token ids, M-RoPE positions, pixel values and answer targets.

A sample is (grid, question, filler). Its sequence is the chat prompt SGLang renders followed by the
answer and <|im_end|>; the loss and the accuracy look only at the answer tokens and <|im_end|>
(predicting <|im_end|> is what makes the server stop after the answer).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from benchmarks.tiny_vlm import prompts
from benchmarks.tiny_vlm.grid_task import GridSpec, Question, random_grids, random_question
from benchmarks.tiny_vlm.pixels import MERGE, grid_pixel_values, grid_thw, tokens_per_image

TASK_FILE = "tiny_vlm_task.json"  # beside the checkpoint: the task it was trained on


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """What the model is trained and evaluated on; saved with the checkpoint."""

    spec: GridSpec = GridSpec()
    weights: tuple[tuple[str, float], ...] = (("count", 0.7), ("cell", 0.2), ("most", 0.1))
    max_filler_words: int = 32

    def save(self, model_dir: str | Path) -> None:
        d = dataclasses.asdict(self)
        (Path(model_dir) / TASK_FILE).write_text(json.dumps(d, indent=2) + "\n")

    @classmethod
    def load(cls, model_dir: str | Path) -> "TaskConfig":
        path = Path(model_dir) / TASK_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} missing: {model_dir} was not written by tiny_vlm.train")
        d = json.loads(path.read_text())
        spec = GridSpec(**{**d["spec"], "colours": tuple(d["spec"]["colours"])})
        return cls(spec, tuple((k, float(w)) for k, w in d["weights"]), int(d["max_filler_words"]))


@dataclasses.dataclass(frozen=True)
class Sample:
    grid: np.ndarray  # [cells, cells] palette indices
    question: Question
    filler: str


@dataclasses.dataclass
class Batch:
    input_ids: torch.Tensor     # [B, L], right-padded with PAD_ID
    position_ids: torch.Tensor  # [3, B, L]
    pixel_values: torch.Tensor  # [B * patches, 1176]
    image_grid_thw: torch.Tensor  # [B, 3]
    target_pos: torch.Tensor    # [N] flat index b * L + t of the position that predicts targets[i]
    targets: torch.Tensor       # [N] answer token ids and <|im_end|>
    target_sample: torch.Tensor  # [N] which sample each target belongs to
    image_start: torch.Tensor   # [B] index of the first image token
    samples: list[Sample]
    attention_mask: torch.Tensor | None = None  # [B, 1, L, L] bool (True: may attend), see route_mask


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))


def random_samples(task: TaskConfig, n: int, rng: np.random.Generator) -> list[Sample]:
    grids = random_grids(task.spec, n, rng)
    weights = dict(task.weights)
    return [Sample(g, random_question(g, task.spec, rng, weights),
                   prompts.filler_text(rng, task.max_filler_words)) for g in grids]


def encode(tok: Tokenizer, spec: GridSpec, sample: Sample) -> tuple[list[int], list[int]]:
    """(prompt ids with the image pads expanded, answer ids ending in <|im_end|>)."""
    before, after = prompts.user_text(sample.filler, sample.question.text)
    ids = tok.encode(prompts.render_chat(before, after), add_special_tokens=False).ids
    answer = tok.encode(sample.question.answer, add_special_tokens=False).ids + [prompts.IM_END]
    return prompts.expand_image_pad(ids, tokens_per_image(spec)), answer


def route_mask(seqs: list[list[int]], length: int, routed: np.ndarray) -> np.ndarray:
    """[B, 1, L, L] causal mask in which, for the `routed` samples, the tokens from <|vision_end|> on
    cannot attend to the user text before the image (filler, question, <|vision_start|>).

    Training with it for part of the samples makes the question reach the answer through the image
    tokens' states, as it does in large VLMs, instead of only by the answer attending to the question
    directly; that dependence is what reusing an image's KV after other text gets wrong."""
    mask = np.broadcast_to(np.tril(np.ones((length, length), dtype=bool)), (len(seqs), 1, length, length)).copy()
    for b in np.flatnonzero(routed):
        seq = seqs[b]
        user = [i for i, t in enumerate(seq) if t == prompts.IM_START][1] + 3  # after "<|im_start|>user\n"
        vs, ve = seq.index(prompts.VISION_START), seq.index(prompts.VISION_END)
        mask[b, 0, ve:, user:vs + 1] = False
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
        pos[:, b, :len(seq)] = prompts.mrope_positions(seq, merged)
        for j, t in enumerate(answer):
            target_pos.append(b * length + len(prompt) - 1 + j)
            targets.append(t)
            target_sample.append(b)
        image_start.append(prompt.index(prompts.IMAGE_PAD))
    grids = torch.from_numpy(np.stack([s.grid for s in samples])).to(device)

    def t(x):
        return torch.as_tensor(np.asarray(x), dtype=torch.long, device=device)

    mask = None
    if routed is not None and routed.any():
        mask = torch.from_numpy(route_mask(seqs, length, routed)).to(device)
    return Batch(t(ids), t(pos), grid_pixel_values(grids, spec, image_mean, image_std),
                 t([grid_thw(spec)] * len(samples)), t(target_pos), t(targets), t(target_sample),
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
