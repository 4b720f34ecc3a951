"""Local image files: only what SGLang reads as a file, and never a pseudo-file or a blocking read."""

import os
import time

import pytest

from vlcache_sglang.local_images import local_image_path, read_local_image


def test_only_absolute_paths_and_file_urls_are_local_files():
    assert local_image_path("/tmp/x.png") == "/tmp/x.png"
    assert local_image_path("file:///tmp/a%20b.png") == "/tmp/a b.png"
    assert local_image_path("x.png") is None and local_image_path("./x.png") is None
    assert local_image_path("https://example.com/x.png") is None


def _refused(path, **kw):
    with pytest.raises(ValueError, match="local image"):
        read_local_image(str(path), **kw)
    return True


def test_pseudo_files_and_odd_files_are_refused_without_reading(tmp_path):
    start = time.monotonic()
    assert _refused("/proc/kmsg")  # blocks forever if read
    assert _refused("/proc/self/status") and _refused("/dev/zero") and _refused("/sys/kernel/mm")
    link = tmp_path / "innocent.png"
    link.symlink_to("/proc/kmsg")
    assert _refused(link)
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    assert _refused(fifo)  # opening it for reading would block
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert _refused(empty) and _refused(tmp_path / "missing.png") and _refused(tmp_path)
    big = tmp_path / "big.png"
    big.write_bytes(b"x" * 1000)
    assert _refused(big, max_bytes=999)
    assert read_local_image(str(big), max_bytes=1000) == b"x" * 1000
    assert _refused("relative.png")
    assert time.monotonic() - start < 5
