"""Processed-image cache of the tokenizer process: image key -> pixel values and grid.

A hit lets a request skip decoding, resizing and normalising the image, and (because the item's
hash is the key) SGLang's SHA-256 over the pixels. LRU, bounded in bytes. An entry may own a
shared-memory copy of its pixels (`SharedPixels`, what requests ship to the scheduler); evicting it
unlinks the segment's base name at once (requests in flight hold links of their own), so /dev/shm
holds at most `max_bytes` of cached pixels plus those of requests in flight.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from vlcache_sglang.shared_pixels import SharedPixels


@dataclasses.dataclass(frozen=True)
class ProcessedImage:
    pixel_values: torch.Tensor  # [t*h*w patches, C*T*P*P] as the HF processor emits them (CPU)
    grid_thw: tuple[int, int, int]
    shared: Optional["SharedPixels"] = None  # the same pixels in a named segment, when shared

    def feature(self) -> object:
        """What a request's image item carries to the scheduler."""
        return self.shared if self.shared is not None else self.pixel_values

    @property
    def nbytes(self) -> int:
        return self.pixel_values.numel() * self.pixel_values.element_size()

    def num_tokens(self, merge: int) -> int:
        t, h, w = self.grid_thw
        return t * h * w // (merge * merge)


class ProcessedImageCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, ProcessedImage] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: int) -> Optional[ProcessedImage]:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def __contains__(self, key: int) -> bool:
        return key in self._entries

    def put(self, key: int, entry: ProcessedImage) -> bool:
        if entry.shared is not None:
            from vlcache_sglang.shared_pixels import reap_links

            reap_links()
        if key in self._entries or entry.nbytes > self.max_bytes:
            return False
        while self._bytes + entry.nbytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.nbytes
            if old.shared is not None:
                old.shared.unlink()
        self._entries[key] = entry
        self._bytes += entry.nbytes
        return True

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes
