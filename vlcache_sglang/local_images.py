"""Local image files: which strings SGLang reads as files, and reading one safely.

A request may name an image by `file://` URL or absolute path. Read naively, a path is a remote
denial of service: `/proc/kmsg` blocks forever, a FIFO blocks on open, a multi-GB file stalls the
process (REVIEW F5). So the tokenizer reads a local image once, off its event loop, through
`read_local_image`, and hands SGLang the bytes it read.
"""

from __future__ import annotations

import os
import stat
from typing import Optional
from urllib.parse import unquote, urlparse

# Local image files larger than this are refused (a 400), as are pseudo-files and non-regular files.
MAX_LOCAL_IMAGE_BYTES = 128 << 20
# Never read pseudo-files: their sizes lie and reads can block forever (/proc/kmsg).
_PSEUDO_FS = ("/proc/", "/sys/", "/dev/")


def local_image_path(entry: str) -> Optional[str]:
    """The file SGLang's `load_image` would read for this string, or None when it reads none.

    SGLang reads `file://` URLs and absolute paths only (a relative string is decoded as base64)."""
    if entry.startswith("file://"):
        return unquote(urlparse(entry).path)
    if entry.startswith("/"):
        return entry
    return None


def read_local_image(path: str, max_bytes: int = MAX_LOCAL_IMAGE_BYTES) -> bytes:
    """The bytes of a regular image file of at most `max_bytes`; ValueError (a 400) otherwise.

    Blocking I/O: call it off the event loop. Pseudo-files (/proc, /sys, /dev: sizes lie and reads
    can block forever, e.g. /proc/kmsg), FIFOs, devices, empty, oversized and unreadable files and
    files that change size while read are refused without blocking. Stock SGLang would read them in
    its loader thread (and hang that thread, or load gigabytes); no image is any of these."""
    real = os.path.realpath(path)
    if not os.path.isabs(path) or real.startswith(_PSEUDO_FS):
        raise ValueError(f"local image {path!r}: only absolute paths of regular files are read")
    try:
        st = os.stat(real)
        if not stat.S_ISREG(st.st_mode) or not 0 < st.st_size <= max_bytes:
            raise ValueError(f"local image {path!r}: not a regular non-empty file of at most {max_bytes} bytes")
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ValueError(f"local image {path!r} cannot be read: {e.strerror}") from e
    try:
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(fst.st_mode):
            raise ValueError(f"local image {path!r} was replaced while opened")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(fst.st_size + 1)
    except OSError as e:
        raise ValueError(f"local image {path!r} cannot be read: {e.strerror}") from e
    finally:
        os.close(fd)
    if len(data) != fst.st_size:
        raise ValueError(f"local image {path!r} changed while read")
    return data
