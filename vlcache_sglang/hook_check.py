"""Start-up verification that the plugin is wholly installed, on the SGLang it was built for.

SGLang's `HookRegistry.apply_hooks` logs a target it failed to patch and carries on, and skips a
target patched before; the plugin applies hooks from several places (launcher, each scheduler). A
half-installed plugin is worse than none — the budget hook on and the planner hook off charges
requests as reused and reuses nothing — so after installing, each process checks that every hook
vlcache registered is in its target's wrapper chain (`__wrapped__`, as `functools.wraps` leaves it),
that the hooks a scheduler cannot work without were registered at all, and that SGLang is the
version the hooks were written against. Any failure is a VLCacheSetupError naming the target.
"""

from __future__ import annotations

import pkgutil
from typing import Any, Callable, Iterable, Iterator

from vlcache_sglang.setup_checks import VLCacheSetupError

SUPPORTED_SGLANG_VERSION = "0.5.16"
_PACKAGE = "vlcache_sglang"

# Without these a scheduler would serve wrongly or not reuse at all (model hooks are covered by
# "every registered hook took": model_patch registers them before these are checked).
SCHEDULER_TARGETS = (
    "sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_extend",
    "sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req",
    "sglang.srt.managers.schedule_policy.PrefillAdder.add_chunked_req",
    "sglang.srt.managers.scheduler.Scheduler.handle_generate_request",
)
TOKENIZER_TARGETS = ("sglang.srt.multimodal.processors.qwen_vl.QwenVLImageProcessor.process_mm_data_async",)


def check_sglang_version(version: str | None = None) -> None:
    if version is None:
        from sglang.version import __version__ as version
    if version != SUPPORTED_SGLANG_VERSION:
        raise VLCacheSetupError(
            f"vlcache-sglang hooks SGLang {SUPPORTED_SGLANG_VERSION} internals; this is SGLang {version}. "
            f"Install sglang=={SUPPORTED_SGLANG_VERSION} or drop --enable-vlcache."
        )


def _resolve(target: str) -> Any:
    obj_path, attr = target.rsplit(".", 1)
    obj = pkgutil.resolve_name(obj_path)
    raw = obj.__dict__.get(attr) if isinstance(obj, type) else None
    if isinstance(raw, (classmethod, staticmethod)):
        return raw.__func__
    return getattr(obj, attr)


def _ours(fn: Any) -> bool:
    fn = getattr(fn, "__func__", fn)  # bound methods of our hook objects
    return (getattr(fn, "__module__", None) or "").split(".")[0] == _PACKAGE


def _chain(fn: Any) -> Iterator[Any]:
    seen = set()
    while fn is not None and id(fn) not in seen:
        seen.add(id(fn))
        yield fn
        fn = getattr(fn, "__wrapped__", None)


def installed_hooks(target: str) -> list[Callable[..., Any]]:
    """vlcache hooks found in the wrapper chain of `target` (the closures of SGLang's wrappers)."""
    found = []
    for wrapper in _chain(_resolve(target)):
        for cell in getattr(wrapper, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if callable(value) and _ours(value):
                found.append(value)
    return found


def _registered_targets() -> dict[str, list[Callable[..., Any]]]:
    from sglang.srt.plugins.hook_registry import HookRegistry

    return {target: [hook for _, hook, _ in hooks if _ours(hook)]
            for target, hooks in HookRegistry._hooks.items() if any(_ours(h) for _, h, _ in hooks)}


def verify_hooks(required: Iterable[str] = (), only: Iterable[str] | None = None) -> None:
    """Every vlcache hook registered in this process (or on the targets in `only`) took, and each
    `required` target has one."""
    check_sglang_version()
    registered = _registered_targets()
    for target in required:
        if target not in registered:
            raise VLCacheSetupError(f"vlcache: no hook was registered on {target}; the plugin is half installed.")
    if only is not None:
        registered = {t: registered[t] for t in only if t in registered}
    for target, hooks in registered.items():
        try:
            chain = installed_hooks(target)
        except (ImportError, AttributeError, ValueError) as e:
            raise VLCacheSetupError(
                f"vlcache: hook target {target} does not exist in this SGLang ({e}); "
                f"install sglang=={SUPPORTED_SGLANG_VERSION}.") from e
        missing = [h for h in hooks if not any(h == c for c in chain)]
        if missing:
            names = ", ".join(getattr(h, "__qualname__", repr(h)) for h in missing)
            raise VLCacheSetupError(
                f"vlcache: the hook(s) {names} on {target} did not take (SGLang's HookRegistry logs a failed "
                f"target and carries on, and skips one patched earlier); refusing to serve half installed.")
