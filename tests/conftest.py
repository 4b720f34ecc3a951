import os

import pytest
import torch

# Without a GPU, Triton kernels run under Triton's interpreter on CPU tensors. This must be set
# before any kernel module is imported (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run on the GPU host (benchmarks/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def qwen_model_dir(tmp_path_factory):
    """A real Qwen2.5-VL-7B-Instruct directory written by the project's own writer.

    VLCACHE_TEST_MODEL_DIR names one written beforehand (the GPU host has no dashscope wheel).
    """
    from pathlib import Path

    if os.environ.get("VLCACHE_TEST_MODEL_DIR"):
        return Path(os.environ["VLCACHE_TEST_MODEL_DIR"])
    from vlcache_sglang.model_dir import write_model_dir

    return write_model_dir(tmp_path_factory.mktemp("models") / "Qwen2.5-VL-7B-Instruct", "7B")


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def sglang_server_args(qwen_model_dir):
    """Publish ServerArgs for the dummy 7B directory, as SGLang's layers read them globally."""
    from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

    args = ServerArgs(
        model_path=str(qwen_model_dir),
        load_format="dummy",
        device="cuda" if torch.cuda.is_available() else "cpu",
        attention_backend="flashinfer" if torch.cuda.is_available() else "torch_native",
    )
    set_global_server_args_for_scheduler(args)
    return args
