"""Compression's hooks go in through the plugin's one composition root (decode's before SGLang captures its
decode graphs, `plugin.before_model_worker`; the rest in `plugin.install_scheduler`) and are verified
with every other hook: a scheduler with --vlcache-compress-ratio serves with all of them
or refuses to start. Each case runs in a fresh process (hooks patch SGLang's classes for good)."""

from __future__ import annotations

import os
import subprocess
import sys

_INSTALL = """
import sys
from types import SimpleNamespace
import torch
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
sys.path.insert(0, "tests")
from kv_pool import make_kv_pool
from vlcache_sglang import plugin
from vlcache_sglang.compression.install import COMPRESSION_TARGETS, INIT_GRAPH_STATE, RUN_BATCH
from vlcache_sglang.config import VLCacheConfig
from vlcache_sglang.hook_check import installed_hooks
from vlcache_sglang.model_patch.selective_prefill import SelectivePrefill
from vlcache_sglang.radix_mm_cache import MultimodalRadixCache
from vlcache_sglang.setup_checks import VLCacheSetupError

SelectivePrefill.capture_graphs = lambda self, *a: None  # no decoder graphs on the CPU
which = sys.argv[1]
pre_patched = {"pre-patched": RUN_BATCH, "graph-pre-patched": INIT_GRAPH_STATE}.get(which)
if pre_patched:  # someone patched it before us: our hook there would never take
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    HookRegistry.register(pre_patched, lambda *a, **k: None, HookType.BEFORE)
    HookRegistry.apply_hooks()
_, allocator = make_kv_pool(64, 2, 2, 8, "cpu")
req_pool = ReqToTokenPool(size=4, max_context_len=32, device="cpu", enable_memory_saver=False)
params = CacheInitParams(disable=False, req_to_token_pool=req_pool, token_to_kv_pool_allocator=allocator, page_size=1)
alpha = None if which == "off" else 0.1
config = VLCacheConfig(enabled=True, compress_ratio=alpha)
# SGLang's Scheduler.__init__ calls init_model_worker (model, pools, decode graphs) before the cache
# exists; the plugin's BEFORE hook there must be in place, and is run here as SGLang would run it.
assert any(h is plugin.before_model_worker for h in installed_hooks(plugin.INIT_MODEL_WORKER))
try:
    if which != "model-worker-hook-skipped":
        plugin.before_model_worker(SimpleNamespace(server_args=SimpleNamespace(vlcache=config)))
except VLCacheSetupError as e:
    print("REFUSED EARLY", e)
    sys.exit(0)
cache = MultimodalRadixCache(params, config, max_store_tokens=16, num_layers=2, inv_freq=torch.ones(4))
text = SimpleNamespace(hidden_size=8, intermediate_size=16)
ctx = SimpleNamespace(params=params, model_config=SimpleNamespace(hf_text_config=text, dtype=torch.float32),
                      tp_worker=SimpleNamespace(model_runner=SimpleNamespace(model=SimpleNamespace(model=None))))
try:
    plugin.install_scheduler(cache, ctx)
except VLCacheSetupError as e:
    print("REFUSED", e)
    sys.exit(0)
hooked = [t for t in COMPRESSION_TARGETS if installed_hooks(t)]
print("VERIFIED", cache.compression is not None, len(hooked))
"""


def _run(which: str) -> str:
    env = {**os.environ, "SGLANG_PLUGINS": "vlcache", "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", _INSTALL, which], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_compression_hooks_are_installed_and_verified_only_when_it_is_on():
    assert f"VERIFIED True {7}" in _run("on")
    assert "VERIFIED False 0" in _run("off")  # off by default: not one compression hook


def test_a_compression_hook_that_did_not_take_refuses_the_start():
    out = _run("pre-patched")
    assert "REFUSED" in out and "run_batch" in out and "did not take" in out, out[-2000:]


def test_a_decode_graph_hook_that_did_not_take_refuses_before_the_graphs_are_captured():
    out = _run("graph-pre-patched")
    assert "REFUSED EARLY" in out and "init_cuda_graph_state" in out and "did not take" in out, out[-2000:]


def test_compression_refuses_to_start_when_the_model_worker_hook_never_ran():
    out = _run("model-worker-hook-skipped")
    assert "REFUSED" in out and "init_model_worker" in out, out[-2000:]
