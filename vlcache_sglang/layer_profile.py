"""Placeholder of the layer-profile API (replaced by the calibration branch): uniform ratios only."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class LayerProfile:
    sensitivity: tuple[float, ...]
    metric: str
    model: str = ""
    samples: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.sensitivity)

    @classmethod
    def uniform(cls, num_layers: int) -> "LayerProfile":
        return cls(tuple([1.0] * num_layers), metric="uniform")


def load_layer_profile(path: str | Path) -> LayerProfile:
    d = json.loads(Path(path).read_text())
    return LayerProfile(tuple(float(x) for x in d["sensitivity"]), d.get("metric", ""), d.get("model", ""),
                        int(d.get("samples", 0)))


def layer_ratios(profile: LayerProfile, mean_ratio: float) -> tuple[float, ...]:
    return tuple([mean_ratio] * profile.num_layers)
