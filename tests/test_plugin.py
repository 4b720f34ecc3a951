"""The plugin against the real SGLang 0.5.16: flags, start-up checks, cache-backend routing."""

import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

from sglang.srt.plugins import load_plugins

load_plugins()  # as launch_server does, before any args are parsed

from sglang.srt.mem_cache.cache_init_params import CacheInitParams  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixCache  # noqa: E402
from sglang.srt.mem_cache.registry import registered_radix_cache_backends  # noqa: E402
from sglang.srt.server_args import prepare_server_args  # noqa: E402

from vlcache_sglang.config import VLCacheConfig  # noqa: E402
from vlcache_sglang.radix_mm_cache import MultimodalRadixCache, vlcache_tree_cache_factory  # noqa: E402
from vlcache_sglang.setup_checks import VLCacheSetupError  # noqa: E402

FLAGS = ["--enable-vlcache", "--vlcache-policy", "--vlcache-recompute-ratio", "--vlcache-first-k",
         "--vlcache-mm-store-tokens", "--vlcache-encoder-cache-mb", "--vlcache-processed-cache-mb",
         "--vlcache-compress-ratio", "--vlcache-compress-budget", "--vlcache-compress-recent-window",
         "--vlcache-compress-sink-tokens", "--vlcache-compress-max-layer-ratio", "--vlcache-compress-uniform-share"]


def _argv(model_dir, *extra):
    # --device cpu lets SGLang resolve its arguments on a machine without a GPU.
    return ["--model-path", str(model_dir), "--load-format", "dummy", "--device", "cpu", *extra]


def test_launch_server_help_lists_the_flags():
    out = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--help"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in FLAGS:
        assert flag in out.stdout, flag


_DUMP_ARGS = """
import dataclasses, json, sys
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.server_args import prepare_server_args
args = prepare_server_args(sys.argv[1:])
print("ARGS=" + json.dumps(dataclasses.asdict(args), sort_keys=True, default=str))
print("EXTRA=" + json.dumps(sorted(set(vars(args)) - {f.name for f in dataclasses.fields(args)})))
"""


def _resolved_args(argv, plugins_env):
    env = {**os.environ, "SGLANG_PLUGINS": plugins_env}
    out = subprocess.run([sys.executable, "-c", _DUMP_ARGS, *argv], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split("=", 1) for line in out.stdout.splitlines() if line[:5] in ("ARGS=", "EXTRA"))
    return json.loads(lines["ARGS"]), json.loads(lines["EXTRA"])


def test_without_the_flag_server_args_are_exactly_stock(qwen_model_dir):
    argv = _argv(qwen_model_dir, "--attention-backend", "flashinfer", "--random-seed", "7")
    ours, ours_extra = _resolved_args(argv, plugins_env="vlcache")
    stock, stock_extra = _resolved_args(argv, plugins_env="no-such-plugin")  # our plugin not loaded
    assert ours == stock
    assert ours_extra == stock_extra


def test_flag_routes_to_vlcache_backend_and_survives_pickling(qwen_model_dir):
    args = prepare_server_args(_argv(qwen_model_dir, "--attention-backend", "triton", "--enable-vlcache",
                                     "--vlcache-policy", "none", "--vlcache-mm-store-tokens", "50000"))
    assert args.radix_cache_backend == "vlcache"
    assert "vlcache" in registered_radix_cache_backends()
    assert args.vlcache == VLCacheConfig(enabled=True, policy="none", mm_store_tokens=50000)
    assert pickle.loads(pickle.dumps(args)).vlcache == args.vlcache  # how schedulers receive it


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--attention-backend", "fa3"], "--attention-backend flashinfer"),
        ([], "--attention-backend in"),  # resolved default on this machine is unsupported
        (["--attention-backend", "flashinfer", "--prefill-attention-backend", "fa3"], "--prefill-attention-backend"),
        (["--attention-backend", "flashinfer", "--disable-radix-cache"], "--disable-radix-cache"),
        (["--attention-backend", "flashinfer", "--page-size", "16"], "--page-size 1"),
        (["--attention-backend", "flashinfer", "--vlcache-recompute-ratio", "1.5"], r"\[0, 1\]"),
        (["--attention-backend", "flashinfer", "--vlcache-mm-store-tokens", "0"], "mm-store-tokens"),
        (["--attention-backend", "flashinfer", "--kv-cache-dtype", "fp8_e4m3"], "Drop --kv-cache-dtype"),
        (["--attention-backend", "flashinfer", "--kv-cache-dtype", "fp8_e5m2"], "--kv-cache-dtype fp8_e5m2"),
        (["--attention-backend", "flashinfer", "--enable-lora"], "drop --enable-lora"),
        (["--attention-backend", "flashinfer", "--tokenizer-worker-num", "2"], "--tokenizer-worker-num"),
        (["--attention-backend", "triton", "--disable-overlap-schedule", "--vlcache-compress-ratio", "0"],
         "--vlcache-compress-ratio"),
        (["--attention-backend", "flashinfer", "--disable-overlap-schedule", "--vlcache-compress-ratio", "0.1"],
         "--decode-attention-backend triton"),
        (["--attention-backend", "triton", "--vlcache-compress-ratio", "0.1"], "Pass --disable-overlap-schedule"),
        (["--attention-backend", "triton", "--disable-overlap-schedule", "--enable-mixed-chunk",
          "--vlcache-compress-ratio", "0.1"], "drop --enable-mixed-chunk"),
        (["--attention-backend", "triton", "--disable-overlap-schedule", "--disaggregation-mode", "prefill",
          "--vlcache-compress-ratio", "0.1"], "--disaggregation-mode prefill"),
        (["--attention-backend", "flashinfer", "--tp-size", "2"], "or pass --vlcache-experimental-parallel"),
        (["--attention-backend", "flashinfer", "--dp-size", "2"], "Drop --dp-size and serve one replica"),
        (["--attention-backend", "flashinfer", "--pp-size", "2", "--vlcache-experimental-parallel"],
         "drop --pp-size"),
        (["--attention-backend", "flashinfer", "--tp-size", "2", "--dp-size", "2", "--enable-dp-attention",
          "--vlcache-experimental-parallel"], "--enable-dp-attention"),
        (["--attention-backend", "triton", "--disable-overlap-schedule", "--tp-size", "2",
          "--vlcache-experimental-parallel", "--vlcache-compress-ratio", "0.1"], "--tp-size 2 yet"),
    ],
)
def test_unsupported_setups_fail_at_startup_naming_the_problem(qwen_model_dir, extra, match):
    with pytest.raises(ValueError, match=match):
        prepare_server_args(_argv(qwen_model_dir, "--enable-vlcache", *extra))


@pytest.mark.parametrize("extra", [["--tp-size", "2"], ["--dp-size", "2"]])
def test_the_experimental_flag_accepts_tp_and_dp(qwen_model_dir, extra):
    args = prepare_server_args(_argv(qwen_model_dir, "--attention-backend", "flashinfer", "--enable-vlcache",
                                     "--vlcache-experimental-parallel", *extra))
    assert args.radix_cache_backend == "vlcache" and args.vlcache.experimental_parallel
    assert (args.tp_size, args.dp_size) == ((2, 1) if extra[0] == "--tp-size" else (1, 2))


def test_an_encoder_cache_size_set_twice_must_agree(qwen_model_dir, monkeypatch):
    """SGLANG_VLM_CACHE_SIZE_MB and --vlcache-encoder-cache-mb size the same cache: a variable that
    says otherwise is refused (it used to win silently); one that agrees, or none, is fine."""
    argv = _argv(qwen_model_dir, "--attention-backend", "flashinfer", "--enable-vlcache", "--vlcache-encoder-cache-mb", "512")
    monkeypatch.setenv("SGLANG_VLM_CACHE_SIZE_MB", "100")
    with pytest.raises(VLCacheSetupError, match="pass --vlcache-encoder-cache-mb 100"):
        prepare_server_args(argv)
    monkeypatch.setenv("SGLANG_VLM_CACHE_SIZE_MB", "512")
    assert prepare_server_args(argv).vlcache.encoder_cache_mb == 512
    monkeypatch.delenv("SGLANG_VLM_CACHE_SIZE_MB")
    prepare_server_args(argv)
    assert os.environ["SGLANG_VLM_CACHE_SIZE_MB"] == "512", "set for the scheduler processes"


def test_compression_flags_reach_the_config_and_need_the_vlcache_flag(qwen_model_dir):
    args = prepare_server_args(_argv(qwen_model_dir, "--enable-vlcache", "--attention-backend", "flashinfer",
                                     "--decode-attention-backend", "triton", "--disable-overlap-schedule",
                                     "--vlcache-compress-ratio", "0.1", "--vlcache-compress-budget", "uniform"))
    assert args.vlcache.compression.compress_ratio == 0.1 and args.vlcache.compression.budget == "uniform"
    assert pickle.loads(pickle.dumps(args)).vlcache == args.vlcache
    off = prepare_server_args(_argv(qwen_model_dir, "--enable-vlcache", "--attention-backend", "flashinfer"))
    assert not off.vlcache.compression.enabled  # off by default
    with pytest.raises(VLCacheSetupError, match="pass --enable-vlcache"):
        prepare_server_args(_argv(qwen_model_dir, "--attention-backend", "triton", "--vlcache-compress-ratio", "0.1"))


def test_a_compressing_server_with_sglangs_default_decode_splits_is_warned(qwen_model_dir, monkeypatch):
    """8 splits (SGLang's default) serve correctly but slowly at small batches of long prompts: a warning
    naming the flag, not a refusal; none at 64, none without compression."""
    import vlcache_sglang.plugin as plugin

    warned = []
    monkeypatch.setattr(plugin.logger, "warning", lambda msg, *a: warned.append(msg % a if a else msg))
    base = ["--enable-vlcache", "--attention-backend", "flashinfer", "--decode-attention-backend", "triton",
            "--disable-overlap-schedule"]
    prepare_server_args(_argv(qwen_model_dir, *base, "--vlcache-compress-ratio", "0.1"))
    assert len(warned) == 1 and "Pass --triton-attention-num-kv-splits 64" in warned[0]
    prepare_server_args(_argv(qwen_model_dir, *base, "--vlcache-compress-ratio", "0.1",
                              "--triton-attention-num-kv-splits", "64"))
    prepare_server_args(_argv(qwen_model_dir, *base))
    assert len(warned) == 1


def test_other_architecture_is_refused(qwen_model_dir, tmp_path):
    other = tmp_path / "Qwen2-VL-7B-Instruct"
    shutil.copytree(qwen_model_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(architectures=["Qwen2VLForConditionalGeneration"], model_type="qwen2_vl")
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(VLCacheSetupError, match="Qwen2VLForConditionalGeneration"):
        prepare_server_args(_argv(other, "--attention-backend", "flashinfer", "--enable-vlcache"))
    # Without the flag the same model starts as stock.
    assert prepare_server_args(_argv(other, "--attention-backend", "flashinfer")).radix_cache_backend is None


def test_unknown_policy_is_rejected_with_the_choices(qwen_model_dir, capsys):
    with pytest.raises(SystemExit) as e:
        prepare_server_args(_argv(qwen_model_dir, "--enable-vlcache", "--vlcache-policy", "cacheblnd"))
    assert e.value.code == 2
    assert "first_k" in capsys.readouterr().err


def _ctx(server_args, architectures):
    params = CacheInitParams(disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=None, page_size=1)
    model_config = SimpleNamespace(hf_config=SimpleNamespace(architectures=architectures), num_hidden_layers=28)
    return SimpleNamespace(server_args=server_args, params=params, model_config=model_config, tp_worker=None)


def test_factory_builds_a_radix_cache_only_for_a_vlcache_server():
    enabled = SimpleNamespace(vlcache=VLCacheConfig(enabled=True))
    cache = vlcache_tree_cache_factory(_ctx(enabled, ["Qwen2_5_VLForConditionalGeneration"]))
    assert isinstance(cache, MultimodalRadixCache) and isinstance(cache, RadixCache)
    assert cache.num_layers == 28 and cache.policy.name == "image_bounded"  # the default
    with pytest.raises(VLCacheSetupError, match="--enable-vlcache"):
        vlcache_tree_cache_factory(_ctx(SimpleNamespace(), ["Qwen2_5_VLForConditionalGeneration"]))
    with pytest.raises(VLCacheSetupError, match="LlamaForCausalLM"):
        vlcache_tree_cache_factory(_ctx(enabled, ["LlamaForCausalLM"]))


def test_an_sglang_version_other_than_the_pinned_one_is_refused():
    from vlcache_sglang.hook_check import check_sglang_version

    check_sglang_version()  # the installed one
    with pytest.raises(VLCacheSetupError, match="sglang==0.5.16"):
        check_sglang_version("0.5.17")


def test_the_processor_hook_is_verified_after_start_up(qwen_model_dir):
    from vlcache_sglang.hook_check import TOKENIZER_TARGETS, installed_hooks

    prepare_server_args(_argv(qwen_model_dir, "--attention-backend", "flashinfer", "--enable-vlcache"))
    hooks = installed_hooks(TOKENIZER_TARGETS[0])
    assert any(getattr(h, "__name__", "") == "around_process" for h in hooks)


@pytest.mark.parametrize("target", [
    "sglang.srt.managers.schedule_batch.ScheduleBatch.no_such_method",  # apply_hooks logs and carries on
    "sglang.srt.server_args.ServerArgs.add_cli_args",  # patched before: apply_hooks skips it
])
def test_a_hook_that_did_not_take_is_a_setup_error(target):
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from vlcache_sglang.hook_check import verify_hooks
    from vlcache_sglang.receive_guard import around_handle_generate_request

    HookRegistry.register(target, around_handle_generate_request, HookType.AROUND)
    try:
        HookRegistry.apply_hooks()
        with pytest.raises(VLCacheSetupError, match=target.rsplit(".", 1)[-1]):
            verify_hooks()
    finally:
        HookRegistry._hooks[target] = [h for h in HookRegistry._hooks[target] if h[1] is not around_handle_generate_request]
        if not HookRegistry._hooks[target]:
            del HookRegistry._hooks[target]


def test_a_required_hook_never_registered_is_a_setup_error():
    from vlcache_sglang.hook_check import SCHEDULER_TARGETS, verify_hooks

    with pytest.raises(VLCacheSetupError, match="half installed"):
        verify_hooks(required=SCHEDULER_TARGETS[:1], only=())


_SCHEDULER_INSTALL = """
import sys, torch
from sglang.srt.plugins import load_plugins
load_plugins()
from vlcache_sglang import model_patch, prefill_budget, receive_guard
from vlcache_sglang.hook_check import SCHEDULER_TARGETS, verify_hooks
from vlcache_sglang.setup_checks import VLCacheSetupError
model_patch.install(torch.ones(4))  # what the cache factory installs in a scheduler
receive_guard.install()
if sys.argv[1] == "all":
    prefill_budget.install(6)
try:
    verify_hooks(required=SCHEDULER_TARGETS)
except VLCacheSetupError as e:
    print("REFUSED", e)
    sys.exit(0)
print("VERIFIED")
"""


def test_a_scheduler_verifies_every_hook_and_refuses_a_half_install():
    env = {**os.environ, "SGLANG_PLUGINS": "vlcache", "TRITON_INTERPRET": "1"}
    for which, want in (("all", "VERIFIED"), ("no-budget", "REFUSED")):
        out = subprocess.run([sys.executable, "-c", _SCHEDULER_INSTALL, which], capture_output=True, text=True,
                             env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert want in out.stdout, (which, out.stdout[-2000:])
    assert "add_one_req" in out.stdout, "the refusal names the missing hook"
