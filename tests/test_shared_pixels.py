"""Shared pixel segments: one copy at adoption, a reference per request, a mapping on the scheduler
side; lifetime by references, a bounded /dev/shm, and a sweep that never raises nor touches others."""

import fcntl
import os
import pickle
import uuid
from array import array
from types import SimpleNamespace

import pytest
import torch

from vlcache_sglang import shared_pixels
from vlcache_sglang.processed_image_cache import ProcessedImage, ProcessedImageCache
from vlcache_sglang.shared_pixels import PREFIX, SHM_DIR, MissingPixels, SharedPixels, live_bytes, sweep_stale

pytestmark = pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason="needs POSIX shared memory (/dev/shm)")


def _path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


def _unwrap(blob: bytes):
    from sglang.srt.managers.mm_utils import _unwrap_tensor_or_list

    return _unwrap_tensor_or_list(pickle.loads(blob))  # what SGLang's scheduler runs on every request


def test_a_request_pickles_a_name_and_the_scheduler_maps_equal_pixels_and_consumes_it():
    pixels = torch.randn(64, 1176).to(torch.bfloat16)
    sp = SharedPixels(pixels)
    try:
        blob = pickle.dumps(sp)
        assert len(blob) < 1024 < pixels.numel() * 2
        link = pickle.loads(blob).shm_name
        assert link != sp.shm_name and os.path.exists(_path(link)), "each request holds its own link"
        mapped = _unwrap(blob)
        assert mapped.dtype == torch.bfloat16 and torch.equal(mapped, pixels)
        assert not os.path.exists(_path(link)), "the scheduler consumed the request's reference"
        mapped.add_(1)  # copy-on-write: the cached segment is untouched
        assert torch.equal(_unwrap(pickle.dumps(sp)), pixels)
        assert os.path.exists(_path(sp.shm_name)), "the cache's own name stays"
    finally:
        sp.unlink()
    assert not os.path.exists(_path(sp.shm_name))


def test_a_request_sent_before_eviction_maps_after_it_with_no_timer():
    sp = SharedPixels(torch.arange(10, dtype=torch.float32))
    in_flight = pickle.dumps(sp)  # e.g. one of n>1 copies, or a request queued behind a long forward
    sp.unlink()  # evicted
    assert _unwrap(in_flight).tolist() == list(range(10))


def test_a_pickle_after_the_base_name_is_gone_ships_the_pixels_inline():
    sp = SharedPixels(torch.arange(6, dtype=torch.float32))
    os.unlink(_path(sp.shm_name))  # logind RemoveIPC, someone's rm, a foreign sweep
    blob = pickle.dumps(sp)
    assert pickle.loads(blob).shm_name is None
    assert _unwrap(blob).tolist() == list(range(6))


def test_a_missing_segment_is_a_per_request_error_not_an_exception():
    sp = SharedPixels(torch.ones(8))
    blob = pickle.dumps(sp)
    os.unlink(_path(pickle.loads(blob).shm_name))  # the request's link vanished on the way
    got = _unwrap(blob)
    assert isinstance(got, MissingPixels) and "No such file" in got.error
    sp.unlink()


def test_the_scheduler_answers_a_request_with_missing_pixels_with_an_error(sglang_server_args):
    from sglang.srt.managers.schedule_batch import FINISH_ABORT, Modality, MultimodalDataItem
    from sglang.srt.sampling.sampling_params import SamplingParams

    from vlcache_sglang.receive_guard import around_handle_generate_request

    item = MultimodalDataItem(modality=Modality.IMAGE, feature=MissingPixels("x", "gone"), offsets=[(1, 4)])
    params = SamplingParams(max_new_tokens=4)
    params.normalize(None)
    recv = SimpleNamespace(rid="r1", input_text="", input_ids=array("q", [1, 2, 3, 4, 5, 6]), sampling_params=params,
                           mm_inputs=SimpleNamespace(mm_items=[item]), http_worker_ipc=None)
    queued, called = [], []
    scheduler = SimpleNamespace(model_config=SimpleNamespace(vocab_size=1000), tokenizer=None,
                                init_req_max_new_tokens=lambda req: None, _add_request_to_queue=queued.append)
    from sglang.srt.runtime_context import get_parallel

    with get_parallel().override(tp_rank=0):  # a scheduler process has its TP group
        around_handle_generate_request(lambda *a: called.append(a), scheduler, recv)
    assert not called, "SGLang's own handling never sees the marker"
    assert len(queued) == 1 and isinstance(queued[0].to_finish, FINISH_ABORT)
    assert queued[0].to_finish.status_code == 503 and "retry" in queued[0].to_finish.message
    ok = SimpleNamespace(mm_inputs=SimpleNamespace(mm_items=[]))
    around_handle_generate_request(lambda *a: called.append(a), scheduler, ok)
    assert len(called) == 1, "other requests go to SGLang unchanged"


def test_evicted_images_are_unlinked_at_once_and_shm_stays_within_the_cache_bound():
    size, n_cache = 4 * 1024, 3
    cache = ProcessedImageCache(max_bytes=n_cache * size)
    before = live_bytes()
    entries = []
    for key in range(20):  # a stream of distinct images
        sp = SharedPixels(torch.full((size // 4,), float(key)))
        entries.append(sp)
        assert cache.put(key, ProcessedImage(sp.local(), (1, 4, 4), sp))
        assert live_bytes() - before <= n_cache * size, f"after {key + 1} puts"
    assert not os.path.exists(_path(entries[0].shm_name)) and os.path.exists(_path(entries[-1].shm_name))
    for sp in entries[-n_cache:]:
        sp.unlink()


def test_links_no_scheduler_consumed_are_reaped_after_the_timeout():
    sp = SharedPixels(torch.ones(4))
    link = pickle.loads(pickle.dumps(sp)).shm_name  # a request that never reached the scheduler
    consumed = pickle.dumps(sp)
    _unwrap(consumed)
    assert shared_pixels.reap_links(timeout_s=3600) == 0 and os.path.exists(_path(link))
    assert shared_pixels.reap_links(timeout_s=0) == 1 and not os.path.exists(_path(link))
    sp.unlink()


def _plant(name: str) -> str:
    path = _path(name)
    with open(path, "wb") as f:
        f.write(b"x")
    return path


def test_the_sweep_never_raises_on_hostile_names_and_errors(monkeypatch):
    hostile = [f"{PREFIX}99999999999999999999_x", f"{PREFIX}{'f' * 32}_99999999999999999999_lock",
               f"{PREFIX}_", f"{PREFIX}{'a' * 32}_1_lock"]  # the last: a lock of a dead owner, not ours?
    paths = [_plant(n) for n in hostile]
    os.mkdir(_path(f"{PREFIX}{'b' * 32}_1_lock"))  # a directory where a lock should be
    try:
        sweep_stale()
        monkeypatch.setattr(os, "listdir", lambda d: (_ for _ in ()).throw(PermissionError("denied")))
        assert sweep_stale() == 0
    finally:
        monkeypatch.undo()
        for p in paths:
            if os.path.exists(p):
                os.unlink(p)
        os.rmdir(_path(f"{PREFIX}{'b' * 32}_1_lock"))


def test_the_sweep_removes_a_dead_servers_files_and_keeps_a_live_ones():
    live, dead = uuid.uuid4().hex, uuid.uuid4().hex
    pid = 2**22 + 12345  # above the default pid_max: looks dead, as a live server in another PID namespace does
    files = {t: [_plant(f"{PREFIX}{t}_{pid}_{uuid.uuid4().hex[:8]}") for _ in range(2)] + [_plant(f"{PREFIX}{t}_{pid}_lock")]
             for t in (live, dead)}
    holder = os.open(files[live][-1], os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)  # the live server holds its lock
    mine = SharedPixels(torch.ones(2))
    try:
        assert sweep_stale() >= 2
        assert all(not os.path.exists(p) for p in files[dead]), "dead owner: segments and lock removed"
        assert all(os.path.exists(p) for p in files[live]), "live owner, whatever its pid looks like"
        assert os.path.exists(_path(mine.shm_name))
    finally:
        os.close(holder)
        mine.unlink()
    assert sweep_stale() >= 2 and all(not os.path.exists(p) for p in files[live]), "once it died"


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to plant another user's files")
def test_the_sweep_leaves_other_users_files_alone():
    token = uuid.uuid4().hex
    seg, lock = _plant(f"{PREFIX}{token}_1_{'c' * 8}"), _plant(f"{PREFIX}{token}_1_lock")
    try:
        os.chown(lock, 65534, 65534)
        sweep_stale()
        assert os.path.exists(seg) and os.path.exists(lock)
        os.chown(lock, 0, 0)
        os.chown(seg, 65534, 65534)
        sweep_stale()
        assert os.path.exists(seg) and not os.path.exists(lock), "a dead owner's lock goes, another user's file stays"
    finally:
        for p in (seg, lock):
            if os.path.exists(p):
                os.unlink(p)
