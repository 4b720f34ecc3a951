"""Processed pixels of a cached image in one shared-memory segment, shipped to the scheduler as a name.

Stock SGLang (single node) copies every request's pixel values into a fresh /dev/shm segment in the
tokenizer process and clones them out again in the scheduler (`ShmPointerMMData`): two 25 MB copies
per 1080p image, on every request, although a recurring image's pixels are rarely used at all (the
scheduler's encoder-output cache and our KV store serve it). `SharedPixels` is written once, when the
tokenizer-side cache adopts the image; each request then pickles only the segment's name, and the
scheduler maps the segment copy-on-write instead of cloning it (SGLang's `unwrap_shm_features` calls
`materialize()` on every `ShmPointerMMData`, so subclassing it is how the handle enters that path).

Lifetime: the tokenizer-side cache owns the segment. Evicting an image only schedules the unlink
(`UNLINK_GRACE_S`), so a request already sent can still map it; an existing mapping stays valid after
the unlink. Names follow SGLang's `make_shm_name` (creator pid inside), and `sweep_stale()` removes
our segments whose creator died without unlinking them (servers are often stopped with SIGKILL).
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import time
from multiprocessing import shared_memory
from typing import Optional

import torch
from sglang.srt.managers.mm_utils import ShmPointerMMData
from sglang.srt.utils.stale_shm_cleanup import make_shm_name

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
NAME_KIND = "vlcachepx"  # segment names: sgl_shm_vlcachepx_<pid>_<rand>
UNLINK_GRACE_S = 60.0  # a request reaches the scheduler's receiver in well under a second; 60 s is slack for stalls


class SharedPixels(ShmPointerMMData):
    """A read-only pixel tensor in a named segment; pickles to (name, shape, dtype)."""

    def __init__(self, tensor: torch.Tensor) -> None:  # noqa: super().__init__ would make a one-shot copy
        tensor = tensor.detach().cpu().contiguous()
        self.shape, self.dtype, self.precomputed_hash = tensor.shape, tensor.dtype, None
        nbytes = max(1, tensor.numel() * tensor.element_size())
        shm = shared_memory.SharedMemory(create=True, size=nbytes, name=make_shm_name(NAME_KIND))
        try:
            # Reserve the pages now: a full /dev/shm is then an OSError here, not a SIGBUS mid-copy.
            os.posix_fallocate(shm._fd, 0, nbytes)
            torch.frombuffer(shm.buf, dtype=torch.uint8)[: tensor.numel() * tensor.element_size()].copy_(
                tensor.view(-1).view(torch.uint8))
        except BaseException:
            shm.close()
            shm.unlink()
            raise
        self.shm_name = shm.name
        shm.close()
        self._shm_handle = None
        _owned.add(self.shm_name)

    def __setstate__(self, state: dict) -> None:
        # Receiving side: remember the name only; materialize() maps the segment when SGLang asks.
        self.shm_name, self.shape, self.dtype = state["shm_name"], state["shape"], state["dtype"]
        self.precomputed_hash = state.get("precomputed_hash")
        self._shm_handle = None

    def materialize(self) -> torch.Tensor:
        """The pixels, mapped copy-on-write: no copy, and a write can never reach the cached segment."""
        path = os.path.join(SHM_DIR, self.shm_name)
        return torch.from_file(path, shared=False, size=math.prod(self.shape), dtype=self.dtype).view(self.shape)

    def unlink(self) -> None:
        _unlink(self.shm_name)


class DeferredUnlinks:
    """Segments of evicted images, unlinked once their grace period has passed."""

    def __init__(self, grace_s: float = UNLINK_GRACE_S) -> None:
        self.grace_s = grace_s
        self._due: list[tuple[float, SharedPixels]] = []

    def add(self, pixels: SharedPixels, now: Optional[float] = None) -> None:
        self._due.append(((time.monotonic() if now is None else now) + self.grace_s, pixels))

    def sweep(self, now: Optional[float] = None) -> int:
        now = time.monotonic() if now is None else now
        ready = [p for due, p in self._due if due <= now]
        self._due = [(due, p) for due, p in self._due if due > now]
        for pixels in ready:
            pixels.unlink()
        return len(ready)

    def __len__(self) -> int:
        return len(self._due)


def share(tensor: torch.Tensor) -> Optional[SharedPixels]:
    """SharedPixels for `tensor`, or None when /dev/shm has no room (the caller ships the tensor)."""
    try:
        return SharedPixels(tensor)
    except OSError as e:
        logger.warning("vlcache: no shared memory for cached pixels (%s); shipping them per request", e)
        return None


def sweep_stale() -> int:
    """Unlink our segments whose creator process is gone; returns how many."""
    removed = 0
    prefix = make_shm_name(NAME_KIND).rsplit("_", 2)[0] + "_"  # sgl_shm_vlcachepx_
    try:
        names = [n for n in os.listdir(SHM_DIR) if n.startswith(prefix)]
    except OSError:
        return 0
    for name in names:
        try:
            pid = int(name[len(prefix):].split("_")[0])
        except ValueError:
            continue
        if pid == os.getpid() or _pid_alive(pid):
            continue
        removed += _unlink(name)
    if removed:
        logger.info("vlcache: removed %d shared pixel segment(s) left by dead processes", removed)
    return removed


_owned: set[str] = set()


def _unlink(name: str) -> int:
    _owned.discard(name)
    try:
        os.unlink(os.path.join(SHM_DIR, name))
        return 1
    except FileNotFoundError:
        return 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: not ours to judge


@atexit.register
def _unlink_owned() -> None:
    for name in list(_owned):
        _unlink(name)
