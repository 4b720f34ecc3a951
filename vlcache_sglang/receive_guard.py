"""Scheduler side: a request whose shared pixels are gone fails alone, not the server.

SGLang maps every request's shared-memory features in its receive loop (`unwrap_shm_features` in
`request_receiver.py`), where an exception brings the scheduler, and so the server, down. Our
`SharedPixels.materialize()` therefore never raises; it leaves a `MissingPixels` marker as the item's
feature, and this AROUND hook on `Scheduler.handle_generate_request` answers such a request with an
error the way SGLang answers any invalid request (a Req finished with an abort, queued, streamed
back), before SGLang's own handling can touch the marker.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any, Callable, Optional

from vlcache_sglang.shared_pixels import MissingPixels

logger = logging.getLogger(__name__)

TARGET = "sglang.srt.managers.scheduler.Scheduler.handle_generate_request"


def missing_pixels(recv_req: Any) -> Optional[MissingPixels]:
    """The first MissingPixels among the request's image features, if any."""
    mm = getattr(recv_req, "mm_inputs", None)
    items = mm.get("mm_items") if isinstance(mm, dict) else getattr(mm, "mm_items", None)
    for item in items or []:
        feature = getattr(item, "feature", None)
        for f in feature if isinstance(feature, (list, tuple)) else (feature,):
            if isinstance(f, MissingPixels):
                return f
    return None


def around_handle_generate_request(original: Callable[..., Any], scheduler: Any, recv_req: Any,
                                   *args: Any, **kwargs: Any) -> Any:
    missing = missing_pixels(recv_req)
    if missing is None:
        return original(scheduler, recv_req, *args, **kwargs)
    from sglang.srt.managers.schedule_batch import FINISH_ABORT, Req

    message = (f"vlcache: the request's cached image pixels ({missing.name}) were removed from /dev/shm "
               f"before the scheduler could map them ({missing.error}); retry the request")
    # As SGLang's handle_generate_request answers a request it cannot serve (session not found).
    req = Req(recv_req.rid, recv_req.input_text, recv_req.input_ids, recv_req.sampling_params,
              vocab_size=scheduler.model_config.vocab_size, http_worker_ipc=getattr(recv_req, "http_worker_ipc", None))
    req.tokenizer = scheduler.tokenizer
    req.set_finish_with_abort(message)
    # Not the client's fault, and a retry succeeds (the tokenizer ships the pixels inline then).
    req.to_finish = FINISH_ABORT(message, HTTPStatus.SERVICE_UNAVAILABLE, "ServiceUnavailableError")
    scheduler.init_req_max_new_tokens(req)
    scheduler._add_request_to_queue(req)
    return None


_installed = False


def install() -> None:
    """Hook the scheduler of this process. Idempotent."""
    global _installed
    if _installed:
        return
    _installed = True
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET, around_handle_generate_request, HookType.AROUND)
    HookRegistry.apply_hooks()
