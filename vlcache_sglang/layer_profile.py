"""Per-layer sensitivity profile of the `vlcache` policy, and the per-layer recompute ratios it gives.

A `LayerProfile` holds one sensitivity s_l >= 0 per decoder layer: how much the model's output moves
when layer l alone reuses an image's cached K/V instead of recomputing it (measured by
`python -m vlcache_sglang.calibrate`, metric e.g. "first_token_kl"). The server loads it at start-up
(`--vlcache-profile FILE`) and turns it into ratios r_0..r_{L-1} with `layer_ratios`; for a reused
image of N tokens, layer l recomputes the image's leading max(1, floor(r_l * N)) tokens.

How the ratios follow the profile, and what they cost
-----------------------------------------------------
Recompute sets must be nested (S_{l+1} ⊆ S_l): a token left out at layer l has no hidden state at
layer l+1, so it can be recomputed at a deeper layer only if it was computed at every earlier one.
A sensitive deep layer therefore needs its tokens computed at all layers above it. We keep the sets
nested by making r_l non-increasing in l, shaped by the *suffix maximum* of the profile:

    w_l = max_{j >= l} s_j                (non-increasing; a layer is worth what the layers below need)
    r_l = min(1, c * w_l)                 (c chosen so that mean_l r_l == mean_ratio)

Clipping at 1 is water-filling: the budget a clipped layer cannot take goes to the unclipped layers
in proportion to w_l, which keeps r_l non-increasing. When every layer with w_l > 0 is at 1 and
budget is left (a profile whose deepest layers measured exactly 0), the rest is spread evenly over
that zero tail. A uniform profile, or one that is all zero, gives r_l = mean_ratio at every layer
(then `vlcache` is `first_k` with k = mean_ratio * N) — and so does any profile whose last layer is
its most sensitive: the suffix maximum is then flat, since every layer must compute what the last
one recomputes.

Cost: the compute of the reused image tokens is the mean of r_l over layers (attention and MLP run
for r_l * N tokens at layer l), so at `--vlcache-recompute-ratio R` the profile-driven policy costs
exactly what a uniform ratio R costs; only the allocation across layers changes. The alternative
(compute the hidden states of the max_l r_l set at every layer and keep cached K/V for the
difference) accepts any profile shape but costs max_l r_l; we do not use it.

File format (JSON, written by `save_layer_profile`):

    {"format": "vlcache-layer-profile", "version": 1, "metric": "first_token_kl",
     "model": "/path/to/checkpoint", "samples": 64, "num_hidden_layers": 28,
     "sensitivity": [28 finite floats >= 0]}
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from vlcache_sglang.water_fill import water_fill

FORMAT = "vlcache-layer-profile"
VERSION = 1
_FIX_RECALIBRATE = "rerun `python -m vlcache_sglang.calibrate --model MODEL --requests FILE.jsonl --out PROFILE.json`"


@dataclass(frozen=True)
class LayerProfile:
    """One sensitivity value per decoder layer (finite, >= 0); larger means more worth recomputing."""

    sensitivity: tuple[float, ...]
    metric: str  # e.g. "first_token_kl"
    model: str = ""  # checkpoint path or name it was measured on
    samples: int = 0  # requests the measurement averaged over

    def __post_init__(self) -> None:
        values = tuple(float(s) for s in self.sensitivity)
        if not values:
            raise ValueError("a LayerProfile needs one sensitivity per decoder layer, got none")
        bad = [(i, s) for i, s in enumerate(values) if not (math.isfinite(s) and s >= 0)]
        if bad:
            raise ValueError(f"sensitivities must be finite and >= 0, got {bad[:4]} (layer, value)")
        if not isinstance(self.samples, int) or isinstance(self.samples, bool) or self.samples < 0:
            raise ValueError(f"samples must be an int >= 0, got {self.samples!r}")
        object.__setattr__(self, "sensitivity", values)

    @property
    def num_layers(self) -> int:
        return len(self.sensitivity)

    @classmethod
    def uniform(cls, num_layers: int) -> "LayerProfile":
        """Every layer equally sensitive: `layer_ratios` gives the same ratio everywhere."""
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        return cls(sensitivity=(1.0,) * num_layers, metric="uniform")


def check_profile_matches(profile: LayerProfile, num_layers: int, *, model: str = "") -> None:
    """ValueError unless the profile has one value per decoder layer of the served model."""
    if profile.num_layers != num_layers:
        measured = f" (measured on {profile.model!r})" if profile.model else ""
        served = f" {model!r}" if model else ""
        raise ValueError(
            f"layer profile has {profile.num_layers} layers{measured}, expected {num_layers} "
            f"(num_hidden_layers of the served model{served}); the profile is for another model: "
            f"{_FIX_RECALIBRATE.replace('MODEL', model or 'MODEL')}"
        )


def save_layer_profile(profile: LayerProfile, path: str | Path) -> None:
    """Write the profile as JSON (atomically: a reader never sees half a file)."""
    path = Path(path)
    doc = {"format": FORMAT, "version": VERSION, "metric": profile.metric, "model": profile.model,
           "samples": profile.samples, "num_hidden_layers": profile.num_layers,
           "sensitivity": list(profile.sensitivity)}
    text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a finite number")


def load_layer_profile(path: str | Path) -> LayerProfile:
    """Read a profile written by `save_layer_profile`; ValueError (expected / got / fix) otherwise."""
    path = Path(path)

    def bad(expected: str, got: str, fix: str = _FIX_RECALIBRATE) -> ValueError:
        return ValueError(f"layer profile {path}: expected {expected}, got {got}; fix: {fix}")

    if not path.is_file():
        raise bad("an existing file", "no such file", "pass the path of a file written by vlcache_sglang.calibrate")
    try:
        doc = json.loads(path.read_text(), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise bad("JSON", f"unparseable content ({e})") from None
    if not isinstance(doc, dict):
        raise bad("a JSON object", type(doc).__name__)
    if doc.get("format") != FORMAT:
        raise bad(f'"format": "{FORMAT}"', repr(doc.get("format")))
    if doc.get("version") != VERSION:
        raise bad(f'"version": {VERSION}', repr(doc.get("version")),
                  f"{_FIX_RECALIBRATE} with this version of vlcache_sglang")
    sens = doc.get("sensitivity")
    if (not isinstance(sens, list) or not sens
            or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in sens)):
        raise bad('"sensitivity": a non-empty list of numbers', repr(sens)[:80])
    bad_values = [(i, s) for i, s in enumerate(sens) if not s >= 0]
    if bad_values:
        raise bad("sensitivities >= 0", f"{bad_values[:4]} (layer, value)")
    n = doc.get("num_hidden_layers")
    if n != len(sens):
        raise bad(f'"num_hidden_layers" equal to the {len(sens)} sensitivities', repr(n))
    metric, model, samples = doc.get("metric"), doc.get("model", ""), doc.get("samples", 0)
    if not isinstance(metric, str) or not metric:
        raise bad('"metric": a non-empty string', repr(metric))
    if not isinstance(model, str):
        raise bad('"model": a string', repr(model))
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
        raise bad('"samples": an int >= 0', repr(samples))
    return LayerProfile(tuple(float(s) for s in sens), metric, model, samples)


def layer_ratios(profile: LayerProfile, mean_ratio: float) -> tuple[float, ...]:
    """r_0..r_{L-1} in [0, 1], non-increasing in l, mean == mean_ratio (to rounding), shaped by the
    suffix maximum of the profile (see the module docstring)."""
    if not (isinstance(mean_ratio, (int, float)) and 0.0 <= mean_ratio <= 1.0):
        raise ValueError(f"mean_ratio must be a number in [0, 1], got {mean_ratio!r}")
    L = profile.num_layers
    m = float(mean_ratio)
    if m == 0.0 or m == 1.0:
        return (m,) * L
    suffix, running = [0.0] * L, 0.0
    for l in range(L - 1, -1, -1):
        running = max(running, profile.sensitivity[l])
        suffix[l] = running
    top = suffix[0]
    if top == 0.0 or suffix[-1] == top:  # all zero, or flat after the suffix max
        return (m,) * L
    w = torch.tensor([s / top for s in suffix], dtype=torch.float64)  # in [0, 1]: no overflow for huge ones
    # Non-increasing w gives non-increasing ratios (water_fill is monotone); min() keeps clipped ones at 1.
    return tuple(min(1.0, max(0.0, x)) for x in water_fill(w, m * L, 1.0).tolist())


def step_ratios(ratios: Sequence[float], levels: int) -> tuple[float, ...]:
    """Non-increasing ratios as a step function of at most `levels` values: contiguous runs of layers,
    each at its mean, cut where the squared deviation from the run means is least (exact, by dynamic
    programming over the cut points). The sum, hence the compute, is unchanged, and the result is still
    non-increasing (means of contiguous runs of a non-increasing sequence), so the sets stay nested.
    levels <= 0, or at least as many as the distinct ratios: unchanged.

    Why: the eager loop gathers rows and plans attention at every layer whose set changes (~2.5 ms a
    layer for a 1080p image on the 7B, H200), so a profile with 28 distinct ratios pays that 28 times
    per reuse prefill; `levels` steps pay it `levels` times."""
    r = [float(x) for x in ratios]
    if any(b > a + 1e-12 for a, b in zip(r, r[1:])):
        raise ValueError(f"ratios must be non-increasing (layer_ratios' output), got {r}")
    if levels <= 0 or len(set(r)) <= levels:
        return tuple(r)
    n = len(r)
    s1, s2 = [0.0], [0.0]
    for x in r:
        s1.append(s1[-1] + x)
        s2.append(s2[-1] + x * x)

    def cost(i: int, j: int) -> float:  # squared deviation of r[i:j] from its mean
        return s2[j] - s2[i] - (s1[j] - s1[i]) ** 2 / (j - i)

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(levels + 1)]  # best[g][j]: r[:j] in g runs
    cut = [[0] * (n + 1) for _ in range(levels + 1)]
    best[0][0] = 0.0
    for g in range(1, levels + 1):
        for j in range(g, n + 1):
            best[g][j], cut[g][j] = min((best[g - 1][i] + cost(i, j), i) for i in range(g - 1, j))
    out, j = [0.0] * n, n
    for g in range(levels, 0, -1):
        i = cut[g][j]
        out[i:j] = [(s1[j] - s1[i]) / (j - i)] * (j - i)
        j = i
    return tuple(out)
