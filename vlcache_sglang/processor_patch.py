"""Tokenizer-side shortcut for recurring images (Qwen2.5-VL multimodal processor).

Every image of a request is keyed by a secret-keyed MAC over its raw encoded bytes, the processor
settings and the request's cache salt (`image_key`). The key becomes the image item's `hash` (and so
its pad value, the key of SGLang's encoder-output cache and of our image KV store), so SGLang never
SHA-256-hashes the pixels. Items keyed here carry the key a second time as `KEY_ATTR`; the scheduler
reuses and stores only items whose hash still equals it (a client's `mm_hashes` replaces hashes
after this hook, and SGLang's own 64-bit pixel hashes are not ours to trust).

* All images of the request seen before (under the same salt): the request is built from the
  processed-image cache — no decode, resize or normalisation; only the text is tokenised and M-RoPE
  positions computed, exactly as SGLang's QwenVLImageProcessor does.
* Otherwise SGLang's processor runs as stock; its per-image pixel values are then cached.
* An image that cannot be decoded is a ValueError naming the image: a 4xx for the client, and the
  server keeps serving. Resource errors (EMFILE, ENOSPC, ...) stay server errors.
* Local files (`file://`, absolute paths: what SGLang itself reads) are read once, off the event
  loop and size-capped, and the bytes read are what SGLang decodes (no second read to race);
  pseudo-files (/proc/kmsg), FIFOs, devices and oversized files are a 400, never read.
"""

from __future__ import annotations

import asyncio
import binascii
import copy
import errno
import logging
from typing import Any, Callable, Optional

import torch

from vlcache_sglang.image_key import (
    KEY_ATTR,
    ImageKey,
    ProcessorSettings,
    image_key_from_base64,
    image_key_from_bytes,
)
from vlcache_sglang.local_images import local_image_path, read_local_image
from vlcache_sglang.processed_image_cache import ProcessedImage, ProcessedImageCache
from vlcache_sglang.shared_pixels import share

logger = logging.getLogger(__name__)

# Payloads above this are keyed in a worker thread (decode + MAC of 20 MB is ~25 ms of CPU).
_KEY_OFF_LOOP_BYTES = 1 << 20
# OSErrors that mean "the request named a file that cannot be read", not "the server is short of
# something" (EMFILE, ENOSPC, ENOMEM, EIO stay 5xx).
_CLIENT_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.ELOOP, errno.ENAMETOOLONG}


def _is_decode_error(e: BaseException) -> bool:
    """True when an image of the request is bad: it failed to decode (SGLang wraps PIL's errors in a
    RuntimeError), is a decompression bomb, or names an unreadable file."""
    from PIL import Image

    while e is not None:
        if isinstance(e, (binascii.Error, Image.DecompressionBombError)):
            return True
        if isinstance(e, OSError):  # PIL's decode errors are OSErrors without an errno
            return e.errno is None or e.errno in _CLIENT_ERRNOS
        e = e.__cause__ or e.__context__
    return False


def request_namespace(request_obj: Any) -> tuple[bool, Optional[str]]:
    """(usable, namespace): the request's cache namespace as SGLang builds `Req.extra_key`
    (cache_salt ‖ extra_key, then the LoRA id); usable is False for a shape we do not know."""
    extra = getattr(request_obj, "extra_key", None)
    lora = getattr(request_obj, "lora_id", None)
    if not isinstance(extra, (str, type(None))) or not isinstance(lora, (str, type(None))):
        return False, None
    if lora:
        extra = (extra or "") + lora
    return True, extra


def processor_settings(proc: Any) -> ProcessorSettings:
    """The settings of SGLang's processor that change an image's tokens."""
    ip = proc._processor.image_processor
    size = getattr(ip, "size", None)  # a dict, or transformers' SizeDict (attributes)

    def edge(name: str) -> int:
        value = size.get(name) if isinstance(size, dict) else getattr(size, name, None)
        return int(value or 0)

    # Qwen2-VL processors keep min/max pixels as size's shortest/longest edge (transformers 5).
    min_pixels = getattr(ip, "min_pixels", None) or edge("shortest_edge")
    max_pixels = getattr(ip, "max_pixels", None) or edge("longest_edge")
    # Everything else that shapes the tokens goes in verbatim, so an unusual processor still keys safely.
    knobs = ("patch_size", "merge_size", "temporal_patch_size", "size", "do_resize", "image_mean", "image_std")
    extra = tuple(sorted((k, repr(getattr(ip, k, None))) for k in knobs))
    return ProcessorSettings(model_id=str(proc.server_args.model_path), min_pixels=int(min_pixels),
                             max_pixels=int(max_pixels), extra=extra)


def key_of(entry: Any, settings: ProcessorSettings, namespace: Optional[str] = None) -> Optional[ImageKey]:
    """Key of one in-memory `image_data` entry (bytes, base64, data URL), or None for anything that
    must be fetched or read first (http URLs, local paths). Never touches the file system."""
    data = getattr(entry, "url", entry)
    if isinstance(data, (bytes, bytearray, memoryview)):
        return image_key_from_bytes(data, settings, namespace)
    if not isinstance(data, str):
        return None
    if data.startswith("data:"):
        return image_key_from_base64(data, settings, namespace)
    if "://" in data or local_image_path(data) is not None:
        return None
    return image_key_from_base64(data, settings, namespace)  # SGLang decodes any other string as base64


def _with_payload(entry: Any, payload: bytes) -> Any:
    """`entry` with its file replaced by the bytes read from it (ImageData keeps its other fields)."""
    if hasattr(entry, "url"):
        entry = copy.copy(entry)
        entry.url = payload
        return entry
    return payload


async def _read_local_files(image_data: list) -> list:
    """`image_data` with every local file replaced by its bytes, read once in a worker thread; a
    file we refuse to read (read_local_image) is a ValueError, so SGLang's loader never opens it."""
    data = list(image_data)
    for i, entry in enumerate(image_data):
        raw = getattr(entry, "url", entry)
        path = local_image_path(raw) if isinstance(raw, str) else None
        if path is not None:
            data[i] = _with_payload(entry, await asyncio.to_thread(read_local_image, path))
    return data


class ImageProcessingShortcut:
    def __init__(self, max_bytes: int, pixel_dtype: Optional[torch.dtype] = None, share_pixels: bool = False) -> None:
        """share_pixels: keep cached pixels in shared memory and ship only its name (single-node
        SGLang, where the scheduler unwraps ShmPointerMMData features; see shared_pixels.py)."""
        self.share_pixels = share_pixels
        self.cache = ProcessedImageCache(max_bytes)
        # The vision tower casts pixel values to its own dtype first thing, so caching (and
        # shipping to the scheduler) them in that dtype changes no number and halves the bytes.
        self.pixel_dtype = pixel_dtype
        self._settings: Optional[ProcessorSettings] = None
        self.served_from_cache = 0  # requests built without decoding or processing any image

    async def around_process(self, original: Callable[..., Any], proc: Any, image_data: Any, input_text: Any,
                             request_obj: Any, *args: Any, **kwargs: Any) -> Any:
        keys, image_data = await self._keys(proc, image_data, request_obj)
        if keys is not None and isinstance(input_text, str):
            cached = [self.cache.get(k.value) for k in keys]
            if all(c is not None for c in cached):
                out = build_output_from_cache(proc, input_text, keys, cached)
                if out is not None:
                    self.served_from_cache += 1
                    return out
                logger.warning("vlcache: cached images did not fit the prompt's placeholders; processing as stock")
        try:
            out = await original(proc, image_data, input_text, request_obj, *args, **kwargs)
        except Exception as e:
            if _is_decode_error(e):
                raise ValueError(f"an image of the request could not be decoded: {e}") from e
            raise
        if keys is not None:
            self._adopt(out, keys)
        return out

    async def _keys(self, proc: Any, image_data: Any, request_obj: Any) -> tuple[Optional[list[ImageKey]], Any]:
        """The images' keys (None: leave the request to SGLang) and the image data to process."""
        if not image_data:
            return None, image_data
        data = await _read_local_files(image_data)  # whether or not we key the request
        if getattr(request_obj, "video_data", None) or getattr(request_obj, "audio_data", None):
            return None, data
        if getattr(request_obj, "mm_hashes", None):
            return None, data  # client-chosen hashes replace ours after this hook
        usable, namespace = request_namespace(request_obj)
        if not usable:
            return None, data
        if self._settings is None:
            self._settings = processor_settings(proc)
        keys = []
        for entry in data:
            raw = getattr(entry, "url", entry)
            if isinstance(raw, (str, bytes, bytearray, memoryview)) and len(raw) > _KEY_OFF_LOOP_BYTES:
                key = await asyncio.to_thread(key_of, entry, self._settings, namespace)
            else:
                key = key_of(entry, self._settings, namespace)
            if key is None:
                return None, data
            keys.append(key)
        return keys, data

    def _adopt(self, out: Any, keys: list[ImageKey]) -> None:
        """Give SGLang's freshly processed items our keys as hashes, and cache their pixels."""
        from sglang.srt.managers.schedule_batch import MultimodalProcessorOutput

        images = [item for item in out.mm_items if item.is_image()]
        if len(images) != len(keys) or any(not item.offsets or len(item.offsets) != 1 for item in images):
            return  # an unexpected layout: leave SGLang's own hashing in charge
        for item, key in zip(images, keys):
            item.hash, item.pad_value = key.value, key.pad_value
            setattr(item, KEY_ATTR, key.value)
            grid = item.model_specific_data.get("image_grid_thw")
            if isinstance(item.feature, torch.Tensor) and grid is not None and key.value not in self.cache:
                g = tuple(int(x) for x in torch.as_tensor(grid).reshape(-1)[:3].tolist())
                self._cache_pixels(key.value, item.feature, g)
        out.padded_input_ids = MultimodalProcessorOutput.build_padded_input_ids(out.input_ids, out.mm_items)

    def _cache_pixels(self, key: int, feature: torch.Tensor, grid: tuple[int, int, int]) -> None:
        pixels = feature if self.pixel_dtype is None else feature.to(self.pixel_dtype)
        shared = share(pixels) if self.share_pixels else None
        # With a segment, the cache's own tensor is a mapping of it: the pixels are held once.
        entry = ProcessedImage(shared.local() if shared else pixels, grid, shared)
        if not self.cache.put(key, entry) and shared is not None:
            shared.unlink()


def build_output_from_cache(proc: Any, text: str, keys: list[ImageKey], cached: list[ProcessedImage]) -> Any:
    """What QwenVLImageProcessor.process_mm_data_async returns, from cached processed images."""
    from sglang.srt.layers.rotary_embedding import MRotaryEmbedding
    from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem, MultimodalProcessorOutput

    tokens = proc.mm_tokens
    merge = proc._spatial_merge_size
    placeholder = tokens.image_token  # e.g. "<|vision_start|><|image_pad|><|vision_end|>"
    pad = proc._tokenizer.convert_ids_to_tokens(tokens.image_token_id)  # "<|image_pad|>"
    parts = text.split(placeholder)
    if len(parts) != len(keys) + 1 or placeholder.count(pad) != 1:
        return None  # placeholders and images disagree: let SGLang's own path report it
    counts = [c.num_tokens(merge) for c in cached]
    expanded = parts[0] + "".join(placeholder.replace(pad, pad * n) + rest for n, rest in zip(counts, parts[1:]))
    input_ids = proc._tokenizer(expanded, return_tensors="pt", add_special_tokens=True).input_ids.flatten()
    offsets = proc.get_mm_items_offset(input_ids=input_ids, mm_token_id=tokens.image_token_id)
    if [e - s + 1 for s, e in offsets] != counts:
        return None
    grids = torch.tensor([c.grid_thw for c in cached])
    items = [
        MultimodalDataItem(modality=Modality.IMAGE, hash=key.value, pad_value=key.pad_value, offsets=[off],
                           feature=c.feature(), model_specific_data={"image_grid_thw": grids[i : i + 1]})
        for i, (key, c, off) in enumerate(zip(keys, cached, offsets))
    ]
    for item, key in zip(items, keys):
        setattr(item, KEY_ATTR, key.value)
    mrope_positions, mrope_delta = MRotaryEmbedding.get_rope_index(
        spatial_merge_size=merge, image_token_id=tokens.image_token_id, video_token_id=tokens.video_token_id,
        vision_start_token_id=proc.vision_start_token_id, model_type=proc.model_type,
        tokens_per_second=proc._tokens_per_second, input_ids=input_ids.unsqueeze(0), image_grid_thw=grids,
        video_grid_thw=None, second_per_grid_ts=None, use_audio_in_video=False, audio_seqlens=None,
        audio_token_id=getattr(proc.hf_config, "audio_token_id", None),
        audio_start_token_id=proc.audio_start_token_id,
        position_id_per_seconds=getattr(proc.hf_config, "position_id_per_seconds", None),
    )
    if mrope_positions.ndim == 3:
        mrope_positions = mrope_positions.squeeze(1)
    ids = input_ids.tolist()
    return MultimodalProcessorOutput(
        input_ids=ids, padded_input_ids=MultimodalProcessorOutput.build_padded_input_ids(ids, items),
        mm_items=items, im_start_id=proc.vision_start_token_id, im_end_id=proc.vision_end_token_id,
        im_token_id=tokens.image_token_id, video_token_id=tokens.video_token_id,
        audio_token_id=tokens.audio_token_id, mrope_positions=mrope_positions, mrope_position_delta=mrope_delta,
    )
