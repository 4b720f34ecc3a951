"""Save the trained model as a checkpoint SGLang loads, and load it back with transformers.

transformers 5 names weights `model.language_model.*` / `model.visual.*`; SGLang 0.5.16's
Qwen2_5_VLForConditionalGeneration.load_weights matches names literally against its parameters
(`model.*`, `visual.*`, `lm_head.*`) and silently skips any name it does not know, so a checkpoint
in the new layout would serve random weights. We save in the layout of the released checkpoints,
which both SGLang and transformers load (tested).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Qwen2_5_VLForConditionalGeneration

WEIGHTS_FILE = "model.safetensors"
# transformers 5 prefix -> released-checkpoint prefix (first match wins).
_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))


def released_name(name: str) -> str:
    for new, old in _PREFIXES:
        if name.startswith(new):
            return old + name[len(new):]
    return name


def checkpoint_state(model: Qwen2_5_VLForConditionalGeneration,
                     dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Weights under released names, in `dtype`, on the CPU; the tied lm_head is left out (both
    loaders tie it to the embedding)."""
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    out = {}
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        out[released_name(name)] = t.detach().to("cpu", dtype).contiguous()
    return out


def save_checkpoint(model: Qwen2_5_VLForConditionalGeneration, model_dir: str | Path,
                    dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the weights into a directory that already holds config, tokenizer and processor files."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}/config.json missing: write the directory with "
                                "model_config.write_tiny_model_dir first")
    path = model_dir / WEIGHTS_FILE
    save_file(checkpoint_state(model, dtype), str(path), metadata={"format": "pt"})
    return path


def load_checkpoint(model_dir: str | Path, device: str = "cpu",
                    dtype: torch.dtype = torch.float32) -> Qwen2_5_VLForConditionalGeneration:
    """The trained model, through transformers' own loader (raises on missing weights)."""
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(model_dir), dtype=dtype)
    return model.to(device).eval()
