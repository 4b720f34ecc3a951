"""Check that SGLang 0.5.16 loads every weight of a checkpoint (CPU, no server):

    python -m benchmarks.tiny_vlm.sglang_load_check /tmp/tiny-qwen2.5-vl

SGLang's Qwen2_5_VLForConditionalGeneration.load_weights skips names it does not know without a
word, so a naming mistake would serve random weights. This builds SGLang's model for the directory,
fills every parameter with NaN, loads the checkpoint through load_weights and checks that every
parameter holds exactly the checkpoint's values (fused q/k/v and gate/up included) and that every
checkpoint tensor was used. (A transformers-5 layout is mostly skipped in silence; only some fused
vision names make load_weights raise.) Run it in its own process: it initialises SGLang's global state.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from benchmarks.tiny_vlm.checkpoint import WEIGHTS_FILE

_FUSED = ((".qkv_proj.", (".q_proj.", ".k_proj.", ".v_proj.")), (".gate_up_proj.", (".gate_proj.", ".up_proj.")))


def expected_sources(name: str, ckpt_names: set[str]) -> list[str]:
    """Checkpoint tensors that make up SGLang parameter `name` (concatenated along dim 0)."""
    if name == "lm_head.weight" and name not in ckpt_names:
        return ["model.embed_tokens.weight"]  # tied
    if name.startswith("visual.") and ".attn.qkv_proj." in name:
        return [name.replace(".qkv_proj.", ".qkv.")]  # the vision tower keeps q/k/v fused
    for fused, parts in _FUSED:
        if fused in name:
            return [name.replace(fused, p) for p in parts]
    return [name]


def build_sglang_model(model_dir: str | Path) -> torch.nn.Module:
    """SGLang's model for model_dir on the CPU (single rank, gloo)."""
    import socket

    import sglang.srt.layers.rotary_embedding.base as rope_base
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.distributed import init_distributed_environment, initialize_model_parallel
    from sglang.srt.distributed.parallel_state import model_parallel_is_initialized
    from sglang.srt.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
    from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

    rope_base._is_cpu = True  # native rotary path on a CPU-only host (no vLLM kernel)
    args = ServerArgs(model_path=str(model_dir), device="cpu", attention_backend="torch_native",
                      mm_attention_backend="sdpa")
    set_global_server_args_for_scheduler(args)
    if not model_parallel_is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")
        initialize_model_parallel(1)
    return Qwen2_5_VLForConditionalGeneration(ModelConfig.from_server_args(args).hf_config)


def check(model_dir: str | Path) -> list[str]:
    """Problems found (empty when every parameter was loaded exactly and every tensor used)."""
    ckpt = load_file(str(Path(model_dir) / WEIGHTS_FILE))
    model = build_sglang_model(model_dir)
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for p in params.values():
            p.fill_(float("nan"))
    problems, used = [], set()
    try:
        model.load_weights(iter(ckpt.items()))
    except (KeyError, ValueError, RuntimeError, AssertionError) as e:  # names SGLang cannot place
        problems.append(f"load_weights raised {type(e).__name__}: {e}")
    for name, p in params.items():
        sources = expected_sources(name, set(ckpt))
        missing = [s for s in sources if s not in ckpt]
        if missing:
            problems.append(f"{name}: checkpoint lacks {missing}")
            continue
        used.update(sources)
        want = torch.cat([ckpt[s] for s in sources]).to(p.dtype)
        if want.shape != p.shape or not torch.equal(p.detach(), want):
            nan = int(p.isnan().sum())
            problems.append(f"{name}: not the checkpoint's values ({nan} of {p.numel()} still NaN)")
    problems += [f"{s}: in the checkpoint but no SGLang parameter takes it" for s in sorted(set(ckpt) - used)]
    return problems


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m benchmarks.tiny_vlm.sglang_load_check MODEL_DIR")
    problems = check(argv[0])
    if problems:
        raise SystemExit("SGLang does not load this checkpoint as saved:\n  " + "\n  ".join(problems))
    print(f"SGLang loads every weight of {argv[0]}")


if __name__ == "__main__":
    main()
