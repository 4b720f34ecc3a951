"""Shared pixel segments: one copy at adoption, a name per request, a mapping on the scheduler side."""

import os
import pickle

import pytest
import torch

from vlcache_sglang import shared_pixels
from vlcache_sglang.processed_image_cache import ProcessedImage, ProcessedImageCache
from vlcache_sglang.shared_pixels import SHM_DIR, DeferredUnlinks, SharedPixels, sweep_stale

pytestmark = pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason="needs POSIX shared memory (/dev/shm)")


def _path(sp: SharedPixels) -> str:
    return os.path.join(SHM_DIR, sp.shm_name)


def test_a_request_pickles_the_name_only_and_the_scheduler_maps_equal_pixels():
    from sglang.srt.managers.mm_utils import _unwrap_tensor_or_list

    pixels = torch.randn(64, 1176).to(torch.bfloat16)
    sp = SharedPixels(pixels)
    try:
        blob = pickle.dumps(sp)
        assert len(blob) < 1024 < pixels.numel() * 2
        received = pickle.loads(blob)
        mapped = _unwrap_tensor_or_list(received)  # what SGLang's scheduler runs on every request
        assert mapped.dtype == torch.bfloat16 and torch.equal(mapped, pixels)
        mapped.add_(1)  # copy-on-write: the cached segment is untouched
        assert torch.equal(pickle.loads(blob).materialize(), pixels)
        assert os.path.exists(_path(sp)), "materialize must not unlink: later requests ship the same name"
    finally:
        sp.unlink()
    assert not os.path.exists(_path(sp))


def test_a_mapping_outlives_the_unlink():
    sp = SharedPixels(torch.arange(10, dtype=torch.float32))
    mapped = pickle.loads(pickle.dumps(sp)).materialize()
    sp.unlink()
    assert mapped.tolist() == list(range(10))


def test_deferred_unlinks_wait_for_the_grace_period():
    sp = SharedPixels(torch.ones(4))
    unlinks = DeferredUnlinks(grace_s=10.0)
    unlinks.add(sp, now=100.0)
    assert unlinks.sweep(now=105.0) == 0 and os.path.exists(_path(sp))
    assert unlinks.sweep(now=110.0) == 1 and not os.path.exists(_path(sp))
    assert len(unlinks) == 0


def test_evicting_a_cached_image_schedules_its_segment_for_unlink():
    unlinks = DeferredUnlinks(grace_s=0.0)
    cache = ProcessedImageCache(max_bytes=3 * 4 * 16, unlinks=unlinks)
    entries = []
    for key in range(4):
        sp = SharedPixels(torch.full((16,), float(key)))
        entries.append(sp)
        assert cache.put(key, ProcessedImage(sp.materialize(), (1, 4, 4), sp))
    assert 0 not in cache and len(unlinks) == 1  # key 0 was evicted by key 3
    cache.put(9, ProcessedImage(torch.zeros(1), (1, 1, 1)))  # the next put sweeps
    assert not os.path.exists(_path(entries[0]))
    assert all(os.path.exists(_path(sp)) for sp in entries[1:])
    for sp in entries[1:]:
        sp.unlink()


def test_segments_of_dead_creators_are_swept_and_live_ones_kept():
    mine = SharedPixels(torch.ones(2))
    dead_pid = 2**22 + 12345  # above the default pid_max: no such process
    stale = os.path.join(SHM_DIR, f"sgl_shm_{shared_pixels.NAME_KIND}_{dead_pid}_deadbeef")
    open(stale, "wb").close()
    try:
        assert sweep_stale() >= 1
        assert not os.path.exists(stale) and os.path.exists(_path(mine))
    finally:
        mine.unlink()
        if os.path.exists(stale):
            os.unlink(stale)
