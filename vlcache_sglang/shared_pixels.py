"""Processed pixels of a cached image in one shared-memory segment, shipped to the scheduler as a name.

Stock SGLang (single node) copies every request's pixel values into a fresh /dev/shm segment in the
tokenizer process and clones them out again in the scheduler (`ShmPointerMMData`): two 25 MB copies
per 1080p image, on every request, although a recurring image's pixels are rarely used at all (the
scheduler's encoder-output cache and our KV store serve it). `SharedPixels` is written once, when the
tokenizer-side cache adopts the image; each request then ships only a name, and the scheduler maps
the segment copy-on-write instead of cloning it (SGLang's `unwrap_shm_features` calls `materialize()`
on every `ShmPointerMMData`, so subclassing it is how the handle enters that path).

Lifetime, by references (REVIEW F4, F10). The cache entry owns the segment's base name. Every pickle
of a `SharedPixels` (one per request sent) hard-links the segment under a fresh name — no data is
copied — and the scheduler's `materialize()` maps that name and unlinks it, as stock SGLang unlinks
its per-request segments. So eviction unlinks the base name at once: a request already sent holds
its own link, and a mapping outlives every unlink. /dev/shm then holds the cache's bytes plus the
images of requests in flight (which stock SGLang would hold too, once per request). Links the
scheduler never consumed (a request lost on the way) are reclaimed after `LINK_TIMEOUT_S`. When the
base name is gone (logind's RemoveIPC, someone's `rm`) a pickle ships the pixels inline instead.

Names: `sgl_shm_vlcachepx_<token>_<pid>_<rand>`, where `token` is random per server process. The
process holds an flock on `sgl_shm_vlcachepx_<token>_<pid>_lock` for its lifetime; `sweep_stale()`
removes a token's files only when it can take that lock (the owner is dead: the kernel drops the lock
with the process, in any PID namespace sharing this /dev/shm) and only files this user owns. Names
without a lock (other servers, other versions, hostile files) are never touched, and the sweep never
raises (REVIEW F3).
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import math
import os
import re
import stat
import time
import uuid
from multiprocessing import shared_memory
from typing import Optional

import torch
from sglang.srt.managers.mm_utils import ShmPointerMMData

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
NAME_KIND = "vlcachepx"
PREFIX = f"sgl_shm_{NAME_KIND}_"  # SGLang's make_shm_name layout: sgl_shm_<kind>_..._<pid>_<rand>
LINK_TIMEOUT_S = 600.0  # a request reaches the scheduler's receiver within one scheduler iteration
_TOKEN = uuid.uuid4().hex  # this server process's name space in /dev/shm
_FILE_RE = re.compile(rf"{PREFIX}([0-9a-f]{{32}})_([0-9]{{1,10}})_([0-9a-f]{{8}}|lock)")


def _new_name() -> str:
    return f"{PREFIX}{_TOKEN}_{os.getpid()}_{uuid.uuid4().hex[:8]}"


class MissingPixels:
    """What `materialize()` returns when a request's segment is gone: the scheduler's receive path
    must not raise (one failed request would take the server down), so the request is answered with
    an error instead (`around_handle_generate_request`)."""

    def __init__(self, name: str, error: str) -> None:
        self.name, self.error = name, error


class SharedPixels(ShmPointerMMData):
    """A read-only pixel tensor in a named segment; each pickle is one reference (a hard link)."""

    def __init__(self, tensor: torch.Tensor) -> None:  # noqa: super().__init__ would make a one-shot copy
        tensor = tensor.detach().cpu().contiguous()
        self.shape, self.dtype, self.precomputed_hash = tensor.shape, tensor.dtype, None
        nbytes = max(1, tensor.numel() * tensor.element_size())
        _ensure_owner_lock()
        shm = shared_memory.SharedMemory(create=True, size=nbytes, name=_new_name())
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
        self._owner = True
        self._local = _map(self.shm_name, self.shape, self.dtype)  # the owner's view; survives unlinks
        _owned.add(self.shm_name)

    # ----- sending side (tokenizer) -----------------------------------------------------------

    def local(self) -> torch.Tensor:
        """The pixels, for the owning process (no reference taken)."""
        return self._local

    def __getstate__(self) -> dict:
        state = {"shape": self.shape, "dtype": self.dtype, "precomputed_hash": self.precomputed_hash}
        link = _link(self.shm_name)
        if link is None:  # the base name is gone: ship the pixels themselves
            state["tensor"] = self._local
        else:
            state["shm_name"] = link
        return state

    def unlink(self) -> None:
        """Drop the owner's name (eviction). Requests in flight keep their own links."""
        _unlink(self.shm_name)

    # ----- receiving side (scheduler) ---------------------------------------------------------

    def __setstate__(self, state: dict) -> None:
        # Remember the name only; materialize() maps the segment when SGLang asks.
        self.shm_name = state.get("shm_name")
        self.shape, self.dtype = state["shape"], state["dtype"]
        self.precomputed_hash = state.get("precomputed_hash")
        self._shm_handle = None
        self._owner = False
        self._local = state.get("tensor")

    def materialize(self) -> "torch.Tensor | MissingPixels":
        """The pixels, mapped copy-on-write (no copy, and a write can never reach the segment); the
        request's link is consumed. MissingPixels, never an exception, when the segment is gone."""
        if self._local is not None:
            return self._local
        try:
            self._local = _map(self.shm_name, self.shape, self.dtype)
        except (OSError, RuntimeError) as e:
            logger.warning("vlcache: shared pixels %s of a request are gone (%s); the request fails",
                           self.shm_name, e)
            return MissingPixels(self.shm_name, str(e))
        _unlink(self.shm_name)
        return self._local

    def __del__(self) -> None:  # nothing to close: segments are mapped by torch, not held open
        pass


def _map(name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    path = os.path.join(SHM_DIR, name)
    return torch.from_file(path, shared=False, size=math.prod(shape), dtype=dtype).view(shape)


def share(tensor: torch.Tensor) -> Optional[SharedPixels]:
    """SharedPixels for `tensor`, or None when /dev/shm has no room (the caller ships the tensor)."""
    try:
        return SharedPixels(tensor)
    except OSError as e:
        logger.warning("vlcache: no shared memory for cached pixels (%s); shipping them per request", e)
        return None


# ----- references ---------------------------------------------------------------------------

_owned: set[str] = set()  # base names of this process's segments
_links: dict[str, float] = {}  # links handed to requests -> creation time (monotonic)


def _link(base: str) -> Optional[str]:
    name = _new_name()
    try:
        os.link(os.path.join(SHM_DIR, base), os.path.join(SHM_DIR, name))
    except OSError:
        return None
    _links[name] = time.monotonic()
    return name


def reap_links(now: Optional[float] = None, timeout_s: float = LINK_TIMEOUT_S) -> int:
    """Forget links the scheduler consumed; unlink those older than `timeout_s` (lost requests)."""
    now = time.monotonic() if now is None else now
    reaped = 0
    for name, born in list(_links.items()):
        if not os.path.lexists(os.path.join(SHM_DIR, name)):
            del _links[name]
        elif now - born > timeout_s:
            reaped += _unlink(name)
    return reaped


def live_bytes() -> int:
    """Bytes of /dev/shm this process's segments hold (distinct inodes, allocated size)."""
    inodes: dict[int, int] = {}
    for name in list(_owned) + list(_links):
        try:
            st = os.stat(os.path.join(SHM_DIR, name))
        except OSError:
            continue
        inodes[st.st_ino] = st.st_blocks * 512
    return sum(inodes.values())


def _unlink(name: str) -> int:
    _owned.discard(name)
    _links.pop(name, None)
    try:
        os.unlink(os.path.join(SHM_DIR, name))
        return 1
    except OSError:
        return 0


# ----- ownership and the start-up sweep -------------------------------------------------------

_lock_fd: Optional[int] = None
_lock_file: Optional[str] = None  # its name, as created (a forked child keeps the parent's)


def _lock_name(token: str = _TOKEN, pid: Optional[int] = None) -> str:
    return f"{PREFIX}{token}_{os.getpid() if pid is None else pid}_lock"


def _ensure_owner_lock() -> None:
    """Hold this process's lock file, flocked from birth (created under a temporary name)."""
    global _lock_fd, _lock_file
    if _lock_fd is not None:
        return
    final = os.path.join(SHM_DIR, _lock_name())
    tmp = os.path.join(SHM_DIR, f"{PREFIX}{_TOKEN}_{os.getpid()}_tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(tmp, final)
    except BaseException:
        os.close(fd)
        _unlink(os.path.basename(tmp))
        raise
    _lock_fd, _lock_file = fd, os.path.basename(final)


def _owner_dead(path: str) -> Optional[int]:
    """An fd holding the lock at `path` when its owner is gone and the file is ours, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid():
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def sweep_stale(shm_dir: Optional[str] = None) -> int:
    """Unlink the segments of dead vlcache servers of this user; returns how many. Never raises."""
    try:
        return _sweep(shm_dir or SHM_DIR)
    except Exception:  # a failed sweep must never stop a server from starting
        logger.warning("vlcache: shared-memory sweep failed; continuing", exc_info=True)
        return 0


def _sweep(shm_dir: str) -> int:
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return 0
    by_token: dict[str, list[str]] = {}
    locks: dict[str, str] = {}
    for name in names:
        m = _FILE_RE.fullmatch(name)
        if m is None or m.group(1) == _TOKEN:
            continue
        if m.group(3) == "lock":
            locks[m.group(1)] = name
        else:
            by_token.setdefault(m.group(1), []).append(name)
    removed = 0
    uid = os.getuid()
    for token, lock in locks.items():
        fd = _owner_dead(os.path.join(shm_dir, lock))
        if fd is None:
            continue  # alive (or not ours): its segments are not ours to judge
        try:
            for name in by_token.get(token, []):
                path = os.path.join(shm_dir, name)
                try:
                    st = os.lstat(path)
                    if stat.S_ISREG(st.st_mode) and st.st_uid == uid:
                        os.unlink(path)
                        removed += 1
                except OSError:
                    continue
            try:
                os.unlink(os.path.join(shm_dir, lock))
            except OSError:
                pass
        finally:
            os.close(fd)
    if removed:
        logger.info("vlcache: removed %d shared pixel segment(s) left by dead servers", removed)
    return removed


_CREATOR_PID = os.getpid()


@atexit.register
def _unlink_owned() -> None:
    global _lock_fd
    if os.getpid() != _CREATOR_PID:
        return  # a forked child exiting: the files are its parent's
    for name in list(_owned) + list(_links):
        _unlink(name)
    if _lock_fd is not None:
        _unlink(_lock_file)
        os.close(_lock_fd)
        _lock_fd = None
