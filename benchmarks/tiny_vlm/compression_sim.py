"""What does VL-Cache compression keep and lose? Plain-torch simulation of per-layer KV compression on a
trained checkpoint (issue 13), next to the server's measurement.

    python -m benchmarks.tiny_vlm.compression_sim --model /tmp/tiny-counts [--requests 128]
        [--alphas 1.0,0.5,0.2,0.1,0.05] [--out report.json]

The held-out requests are those of the checkpoint's compression task (make_eval.compression_samples:
regime C's counts or regime R's rows, the images and questions the server benchmark sends). Pass 1 runs the prompt + answer (teacher forced) with full causal attention and records,
per layer and request, what the server's compression step reads (the post-vision queries' attention over
the prompt: token scores s_l(j) and sparsity gamma_l) and what it cannot see (the attention of the answer's
decode queries over the prompt). Pass 2 runs again with each layer's decode queries (the answer tokens as
inputs, positions >= m) allowed to attend only to that layer's kept prompt tokens and the decode tokens,
while the prompt rows attend in full: the server's compressed decode, teacher forced. Exact match is the
greedy criterion (every answer token and <|im_end|> the argmax given the right ones before it), so it
equals free-running greedy exact match; tokens: the share of answer tokens that are the argmax given the
right ones before them (teacher forced: not the server's cells, which follow the model's own tokens).

Selections at each alpha, all with the server's budget arithmetic (`vlcache_sglang.compression.budget`,
`selection`: the post-vision tail always kept):
- vlcache: beta_l from the sparsity, top-k by the post-vision score (what the server does);
- uniform: beta_l = alpha, the same score (the H2O-like baseline);
- oracle: vlcache's counts, top-k by the decode queries' own attention (future information: an upper
  bound on what any scorer could keep with these budgets);
- random: vlcache's counts, uniformly random tokens beyond the tail (the floor);
- tail (once, alpha shown as 0): the post-vision tail alone at every layer (what every selection keeps).
Diagnostics per alpha and selection: decode recall (share of the decode queries' prompt attention mass on
kept tokens, over layers and requests), key recall (share of the image tokens the answer reads kept: the
asked row's cells, or the coloured cells for counts), and of the kept tokens before the tail the share
that are image tokens and whether the first token is kept. The answer prior (how often the eval set's
commonest answer is right) says whether the model reads the image at all: the row checkpoints did not.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from transformers import AttentionInterface

from benchmarks.tiny_vlm import prompts
from benchmarks.tiny_vlm.batches import Batch, Sample, TaskConfig, answer_logits, load_tokenizer, make_batch
from benchmarks.tiny_vlm.checkpoint import load_checkpoint
from benchmarks.tiny_vlm.grid_task import GridSpec
from benchmarks.tiny_vlm.make_eval import IMAGE_WIDE_KINDS, accuracy, compression_samples  # accuracy: benchmarks/accuracy.py
from benchmarks.tiny_vlm.pixels import tokens_per_image
from vlcache_sglang.compression.budget import SPARSITY_THRESHOLD, kept_counts, layer_budgets
from vlcache_sglang.compression.selection import select_kept_positions

NAME = "vlcache_compression_sim"
SELECTIONS = ("vlcache", "uniform", "oracle", "random")
TAIL = "tail"  # simulated once per request: it does not depend on alpha
ALPHAS = (1.0, 0.5, 0.2, 0.1, 0.05)


@dataclasses.dataclass
class Layout:
    """Per request of a batch: prompt length m, first post-vision position, sequence length, the image
    tokens the answer reads (answer_tokens), every image token."""
    prompt_len: list[int]
    voter_start: list[int]
    seq_len: list[int]
    key_tokens: list[list[int]]
    image_tokens: list[set[int]]


@dataclasses.dataclass
class Observed:
    """Pass 1, one layer, one request: prompt-length vectors (float64, CPU)."""
    scores: torch.Tensor         # [m] s_l(j): post-vision queries' attention, summed over heads and queries
    decode_mass: torch.Tensor    # [m] the decode queries' attention on prompt token j, summed likewise
    sparsity: float              # gamma_l: share of a voter row's valid entries below 1 % of its max


class SimAttention:
    """The text layers' attention (registered as NAME): eager causal softmax in float32; observes in pass 1,
    masks the decode rows' prompt keys to the kept sets in pass 2."""

    def __init__(self) -> None:
        self.layout: Optional[Layout] = None
        self.observed: Optional[dict[int, list[Observed]]] = None   # layer -> per request
        self.kept: Optional[dict[int, torch.Tensor]] = None          # layer -> [B, T] bool, prompt keys kept

    def __call__(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: Optional[torch.Tensor] = None, scaling: Optional[float] = None,
                 dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
        b, h, t, d = query.shape
        rep = h // key.shape[1]
        k = key.float().repeat_interleave(rep, dim=1)
        v = value.float().repeat_interleave(rep, dim=1)
        logits = (query.float() @ k.transpose(-1, -2)) * (d ** -0.5 if scaling is None else scaling)
        allowed = torch.ones(t, t, dtype=torch.bool, device=query.device).tril()[None, None]
        layer = module.layer_idx
        if self.kept is not None:
            allowed = allowed & self._decode_mask(self.kept[layer], t)
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        if self.observed is not None:
            self.observed.setdefault(layer, []).extend(self._observe(probs))
        out = probs @ v                                            # [B, H, T, D]
        return out.transpose(1, 2).to(query.dtype).contiguous(), None

    def _decode_mask(self, kept: torch.Tensor, t: int) -> torch.Tensor:
        """[B, 1, T, T]: a decode row (position >= m) sees a prompt key only if this layer keeps it."""
        m = torch.tensor(self.layout.prompt_len, device=kept.device)[:, None]
        pos = torch.arange(t, device=kept.device)[None]
        decode_row, prompt_col = pos >= m, pos < m
        drop = decode_row[:, :, None] & (prompt_col & ~kept)[:, None, :]
        return ~drop[:, None]

    def _observe(self, probs: torch.Tensor) -> list[Observed]:
        out = []
        for r, (m, v0, n) in enumerate(zip(self.layout.prompt_len, self.layout.voter_start, self.layout.seq_len)):
            voters = probs[r, :, v0:m, :m].double()                # [H, tau, m], causal zeros included
            valid = torch.arange(m, device=probs.device)[None, None] <= torch.arange(v0, m, device=probs.device)[None, :, None]
            row_max = voters.amax(-1, keepdim=True)
            sparse = ((voters < SPARSITY_THRESHOLD * row_max) & valid).sum(-1) / valid.sum(-1)
            decode = probs[r, :, m:n - 1, :m].double()               # rows fed an answer token as input
            out.append(Observed(voters.sum((0, 1)).cpu(), decode.sum((0, 1)).cpu(), float(sparse.mean())))
        return out


@contextlib.contextmanager
def sim_attention(model: torch.nn.Module) -> Iterator[SimAttention]:
    """Route the text layers' attention through a SimAttention for the duration (the vision tower keeps its own)."""
    sim = SimAttention()
    AttentionInterface.register(NAME, sim)
    config = model.model.language_model.config
    before = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield sim
    finally:
        config._attn_implementation = before


def row_target(question_text: str) -> tuple[int, int]:
    """(row, image), 1-based, of a row question (grid_task.row_question's wording; one image: image 1)."""
    found = re.search(r"colours of row (\d+)(?: of image (\d+))?", question_text)
    if not found:
        raise ValueError(f"not a row question: {question_text!r}")
    return int(found.group(1)), int(found.group(2) or 1)


def cell_tokens(cells: Sequence[int], spec: GridSpec) -> list[int]:
    """Offsets in the image's token run of the cells (raster index row * cells + col), sorted: a cell is
    k x k merged tokens (k = cell_px / 28), and merged tokens run in raster order over the image."""
    k = spec.cell_px // 28
    side = spec.cells * k
    out = []
    for cell in cells:
        r, c = divmod(int(cell), spec.cells)
        out += [(r * k + dy) * side + c * k + dx for dy in range(k) for dx in range(k)]
    return sorted(out)


def answer_tokens(sample: Sample, runs: list[tuple[int, int]], spec: GridSpec) -> list[int]:
    """Positions of the image tokens the answer reads: those of the asked row's cells, or of every
    coloured cell of the image for counts and present."""
    kind = sample.question.kind
    if kind == "row":
        row, image = row_target(sample.question.text)
        cells = range((row - 1) * spec.cells, row * spec.cells)
    elif kind in IMAGE_WIDE_KINDS:
        image, cells = 1, np.flatnonzero(sample.grid.ravel() != 0)
    else:
        raise ValueError(f"compression_sim reads row, counts and present questions, got {kind!r}")
    return [runs[image - 1][0] + t for t in cell_tokens(cells, spec)]


def batch_layout(batch: Batch, spec: GridSpec) -> Layout:
    """Prompt lengths, voters (after the last image), sequence lengths and the tokens the answer reads."""
    prompt_len, voter_start, seq_len, rows, images = [], [], [], [], []
    width = batch.input_ids.shape[1]
    owner, where = batch.target_sample.tolist(), batch.target_pos.tolist()
    for r, sample in enumerate(batch.samples):
        # make_batch's targets: position m - 1 + j predicts answer token j (the last: <|im_end|>).
        mine = [p - r * width for o, p in zip(owner, where) if o == r]
        m, n = mine[0] + 1, mine[0] + 1 + len(mine)
        runs = prompts.image_runs(batch.input_ids[r, :m].tolist())
        prompt_len.append(m)
        voter_start.append(runs[-1][1])   # <|vision_end|> on, as post_vision_positions from SGLang's offsets
        seq_len.append(n)
        rows.append(answer_tokens(sample, runs, spec))
        images.append({i for a, b in runs for i in range(a, b)})
    return Layout(prompt_len, voter_start, seq_len, rows, images)


@dataclasses.dataclass(frozen=True)
class Rules:
    """The server's compression options the simulation follows (CompressionConfig's names): the first
    sink_tokens prompt tokens kept at every layer, every beta_l capped at max_budget (water-filled),
    uniform_share of VL-Cache's budgets uniform."""
    sink_tokens: int = 0
    max_budget: float = 1.0
    uniform_share: float = 0.0


Selector = Callable[[torch.Tensor, int, int, int, np.random.Generator], torch.Tensor]


def _top(scores: torch.Tensor, count: int, tail: int, head: int, _rng: np.random.Generator) -> torch.Tensor:
    return select_kept_positions(scores, count, tail, head)


def _random(scores: torch.Tensor, count: int, tail: int, head: int, rng: np.random.Generator) -> torch.Tensor:
    return select_kept_positions(torch.from_numpy(rng.random(scores.numel())), count, tail, head)


def kept_sets(observed: dict[int, list[Observed]], layout: Layout, selection: str, alpha: float,
              rng: np.random.Generator, rules: Rules = Rules()) -> list[list[torch.Tensor]]:
    """Per request, per layer: the kept prompt positions, with the server's budgets, protected tail and
    sinks (compressor.VLCacheCompression.run with no radix prefix)."""
    layers = sorted(observed)
    out = []
    for r, (m, v0) in enumerate(zip(layout.prompt_len, layout.voter_start)):
        obs = [observed[l][r] for l in layers]
        tail, head = m - v0, rules.sink_tokens
        if selection == TAIL:
            counts = [tail] * len(obs)
        elif alpha >= 1.0:  # the server plans nothing at alpha 1, whatever the cap
            counts = [m] * len(obs)
        else:  # oracle and random take vlcache's counts
            method = "uniform" if selection == "uniform" else "vlcache"
            budgets = layer_budgets(method, [o.sparsity for o in obs], alpha, rules.max_budget, rules.uniform_share)
            counts = kept_counts(budgets, m, tail + head)
        pick: Selector = _random if selection == "random" else _top
        out.append([pick(o.decode_mass if selection == "oracle" else o.scores, c, tail, 0 if selection == TAIL else head,
                         rng) for o, c in zip(obs, counts)])
    return out


def kept_masks(sets: list[list[torch.Tensor]], t: int, device: torch.device) -> dict[int, torch.Tensor]:
    masks = {}
    for layer in range(len(sets[0])):
        mask = torch.zeros(len(sets), t, dtype=torch.bool)
        for r, per_layer in enumerate(sets):
            mask[r, per_layer[layer]] = True
        masks[layer] = mask.to(device)
    return masks


def recalls(observed: dict[int, list[Observed]], layout: Layout, sets: list[list[torch.Tensor]]) -> dict[str, float]:
    """Means over requests and layers: decode recall, key recall, the image share of the kept tokens
    before the tail (nan where none is kept there), the first token kept."""
    out: dict[str, list[float]] = {"decode_recall": [], "key_recall": [], "image_share": [], "first_kept": []}
    for r, per_layer in enumerate(sets):
        for layer, kept in enumerate(per_layer):
            mass = observed[layer][r].decode_mass
            kept_set = set(kept.tolist())
            head = [j for j in kept_set if j < layout.voter_start[r]]
            out["decode_recall"].append(float(mass[kept].sum() / mass.sum()) if mass.sum() > 0 else 1.0)
            keys = layout.key_tokens[r]  # counts of an all-white image read no cell: nothing to recall
            out["key_recall"].append(len(set(keys) & kept_set) / len(keys) if keys else np.nan)
            out["image_share"].append(sum(j in layout.image_tokens[r] for j in head) / len(head) if head else np.nan)
            out["first_kept"].append(float(0 in kept_set))
    return {k: _nanmean(v) for k, v in out.items()}


def _nanmean(xs: list[float]) -> float:
    """The mean of the defined values (nan where none is: e.g. no key token in any request)."""
    defined = [x for x in xs if not np.isnan(x)]
    return float(np.mean(defined)) if defined else float("nan")


def score_answers(logits: torch.Tensor, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
    """Per request: exact (greedy would produce the answer and <|im_end|>) and the share of answer
    tokens that are the argmax."""
    hit = (logits.argmax(-1) == batch.targets).double().cpu()
    owner = batch.target_sample.cpu()
    n = len(batch.samples)
    right = torch.zeros(n, dtype=torch.float64).index_add_(0, owner, hit)
    total = torch.zeros(n, dtype=torch.float64).index_add_(0, owner, torch.ones_like(hit))
    return (right == total).numpy(), (right / total).numpy()


@torch.no_grad()
def simulate(model_dir: str | Path, requests: int, alphas: list[float], device: str, batch_size: int = 32,
             selections: tuple[str, ...] = SELECTIONS, seed: int = 0, rules: Rules = Rules()) -> dict:
    task = TaskConfig.load(model_dir)
    tok = load_tokenizer(model_dir)
    pre = json.loads((Path(model_dir) / "preprocessor_config.json").read_text())
    model = load_checkpoint(model_dir, device)
    samples = compression_samples(task, requests)
    rng = np.random.default_rng(seed)
    acc: dict[tuple[str, float], dict[str, list]] = {}
    gammas: list[list[float]] = []
    with sim_attention(model) as sim:
        for i in range(0, len(samples), batch_size):
            batch = make_batch(samples[i:i + batch_size], tok, task.spec, pre["image_mean"], pre["image_std"], device)
            sim.layout = batch_layout(batch, task.spec)
            sim.observed, sim.kept = {}, None
            full_exact, full_tokens = score_answers(answer_logits(model, batch), batch)
            observed, sim.observed = sim.observed, None
            gammas.extend([[observed[l][r].sparsity for l in sorted(observed)] for r in range(len(batch.samples))])
            add(acc, ("full", 1.0), full_exact, full_tokens, recalls(observed, sim.layout, kept_sets(
                observed, sim.layout, "vlcache", 1.0, rng)))
            runs = [(TAIL, 0.0)] + [(selection, alpha) for alpha in alphas for selection in selections]
            for selection, alpha in runs:
                sets = kept_sets(observed, sim.layout, selection, alpha, rng, rules)
                sim.kept = kept_masks(sets, batch.input_ids.shape[1], batch.input_ids.device)
                exact, tokens = score_answers(answer_logits(model, batch), batch)
                sim.kept = None
                add(acc, (selection, alpha), exact, tokens, recalls(observed, sim.layout, sets))
    rows = [{"selection": s, "alpha": a, "n": len(v["exact"]),
             **{k: _nanmean(x) for k, x in v.items()}}
            for (s, a), v in acc.items()]
    return {"model": str(model_dir), "requests": len(samples), "image_tokens": tokens_per_image(task.spec),
            "images_per_request": len(samples[0].grids), "kind": samples[0].kind,
            "answer_prior": accuracy.answer_prior([s.question.answer for s in samples]),
            "rules": dataclasses.asdict(rules), "sparsity_per_layer": np.mean(gammas, axis=0).tolist(), "rows": rows}


def add(acc: dict, key: tuple[str, float], exact: np.ndarray, tokens: np.ndarray, kept: dict[str, float]) -> None:
    """Per request: exact, tokens; per batch: the recalls (means over its requests)."""
    v = acc.setdefault(key, {"exact": [], "tokens": [], **{k: [] for k in kept}})
    v["exact"].extend(exact.tolist())
    v["tokens"].extend(tokens.tolist())
    for k, x in kept.items():
        v[k].append(x)


def table(report: dict) -> str:
    lines = [f"compression simulation, {report['requests']} {report['kind']} requests of "
             f"{report['images_per_request']} image(s) ({report['image_tokens']} tokens each); answer prior "
             f"{report['answer_prior']:.3f}; {report['rules']}; gamma_l = " + " ".join(f"{g:.2f}" for g in report["sparsity_per_layer"]),
             "| selection | alpha | exact | tokens | decode recall | key recall | image share | first kept |",
             "|---|---|---|---|---|---|---|---|"]
    full = next(r["exact"] for r in report["rows"] if r["selection"] == "full")
    if accuracy.at_prior(full, report["answer_prior"]):
        lines.insert(1, f"**Uncompressed exact {full:.3f} does not clear the answer prior: the model reads nothing "
                        "from the image; no row below says anything about compression.**")
    for r in report["rows"]:
        lines.append(f"| {r['selection']} | {r['alpha']} | {r['exact']:.3f} | {r['tokens']:.3f} "
                     f"| {r['decode_recall']:.3f} | {r['key_recall']:.3f} | {r['image_share']:.3f} "
                     f"| {r['first_kept']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint of a compression task (benchmarks/compression_task.sh)")
    p.add_argument("--requests", type=int, default=128, help="held-out requests (make_eval's stream)")
    p.add_argument("--alphas", default=",".join(map(str, ALPHAS)))
    p.add_argument("--selections", default=",".join(SELECTIONS), help=f"any of {SELECTIONS}")
    p.add_argument("--sink-tokens", type=int, default=0, help="as --vlcache-compress-sink-tokens")
    p.add_argument("--max-budget", type=float, default=1.0, help="as --vlcache-compress-max-layer-ratio")
    p.add_argument("--uniform-share", type=float, default=0.0, help="as --vlcache-compress-uniform-share")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="also write the report as JSON here")
    args = p.parse_args(argv)
    selections = tuple(x for x in args.selections.split(",") if x)
    if not selections or not set(selections) <= set(SELECTIONS):
        p.error(f"--selections: choose from {SELECTIONS}, got {args.selections!r}")
    report = simulate(args.model, args.requests, [float(a) for a in args.alphas.split(",")], args.device,
                      selections=selections, rules=Rules(args.sink_tokens, args.max_budget, args.uniform_share))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))


if __name__ == "__main__":
    main()
