"""Measure a Qwen2.5-VL checkpoint's per-layer sensitivity to image-KV reuse; write a LayerProfile.

    python -m vlcache_sglang.calibrate --model PATH --requests FILE.jsonl --out profile.json \\
        [--device cuda|cpu] [--dtype auto|float32|bfloat16|float16] [--max-requests N] \\
        [--batch-tokens T | --layer-batch B]

PATH is any checkpoint directory transformers loads as `Qwen2_5_VLForConditionalGeneration` with its
processor (the real 7B, or `benchmarks/tiny_vlm`'s trained one). FILE.jsonl holds one request per
line, either an OpenAI chat request (`{"messages": [...]}`, images as `image_url` parts holding data
URLs or file paths, relative to the file's folder) as `benchmarks/workloads.py` writes, or an
accuracy-dataset record (`{"prompt": "text <image> text", "images": [...], "system": ...}`).
Requests without an image are skipped.

Method (metric "first_token_kl"). For each request with at least one image:

1. Target: the request as the server renders it (the checkpoint's chat template and processor).
2. Donor: the same token sequence with the *content* tokens before the first image (system prompt,
   history, user text; not the template's role tokens) replaced by other text of the same token
   count — a window of the other requests' content tokens, at a seeded random offset. Every image
   then sits at the same positions, so the donor's image K/V is what the server would cache and
   copy with a rotation by δ = 0: pre-RoPE K at equal positions is the post-RoPE K re-rotated by 0.
3. The donor runs once; forward hooks on every layer's k_proj / v_proj record the image tokens' K/V.
4. For each layer l, the target runs with only layer l's image-token K/V replaced by the donor's
   (every other layer computed fresh), and KL(p_full || p_l) of the next-token distribution at the
   last prompt position is taken against the target's unperturbed forward (a row of the same batch).
   The L perturbed runs are batched: as many per forward as fit in `--batch-tokens` (rows x prompt
   length; default 32768, about 4 GB of transient activations on the 7B in bf16), or `--layer-batch`.
5. sensitivity_l = mean of that KL over the requests.

Layer 0's image K/V depends only on the image's embeddings and positions, not on the text before
it, so sensitivity_0 is 0 up to rounding: a built-in exactness check of the set-up. Image
embeddings are computed once per request (donor and target share the images).

The profile feeds `--vlcache-profile FILE`; `layer_ratios` turns it into the per-layer ratios (see
`vlcache_sglang.layer_profile`). A short table (layer, sensitivity, r_l at `--table-ratio`) is printed.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from vlcache_sglang.layer_profile import LayerProfile, layer_ratios, save_layer_profile

METRIC = "first_token_kl"
IMAGE_MARKER = "<image>"  # the accuracy-dataset prompt's image slot (benchmarks/accuracy.py)
DONOR_SEED = 0
DEFAULT_BATCH_TOKENS = 32768
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _log(msg: str) -> None:
    print(f"calibrate: {msg}", file=sys.stderr, flush=True)


# ----- requests -----------------------------------------------------------------------------------

@dataclass
class CalibRequest:
    """One request with its images referenced in order; `texts_before_image` are the content strings that come
    before the first image (the part the donor replaces)."""

    line: int
    messages: list[dict]  # image parts normalised to {"type": "image"}
    images: list[str]  # data URLs or resolved file paths, in order of appearance
    texts_before_image: list[str]


def _image_ref(part: dict, where: str) -> str:
    ref = part.get("image_url")
    if isinstance(ref, dict):
        ref = ref.get("url")
    if ref is None:
        ref = part.get("image")
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"{where}: an image part needs image_url.url (a data URL or file path), got {part!r:.80}")
    return ref


def _is_image_part(part: dict) -> bool:
    return part.get("type") in ("image_url", "image") or "image_url" in part


def _chat_request(obj: dict, where: str) -> tuple[list[dict], list[str], list[str]]:
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: messages must be a non-empty list")
    out, images, before = [], [], []
    for msg in messages:
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"{where}: each message needs role and content, got {msg!r:.80}")
        content = msg["content"]
        if isinstance(content, str):
            if not images:
                before.append(content)
            out.append({"role": msg["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise ValueError(f"{where}: content must be a string or a list of parts")
        parts = []
        for part in content:
            if not isinstance(part, dict):
                raise ValueError(f"{where}: a content part must be an object, got {part!r:.80}")
            if part.get("type") == "video" or "video" in part or "video_url" in part:
                raise ValueError(f"{where}: video parts are not supported by calibrate; use image requests")
            if _is_image_part(part):
                images.append(_image_ref(part, where))
                parts.append({"type": "image"})
            elif "text" in part:
                if not images:
                    before.append(part["text"])
                parts.append({"type": "text", "text": part["text"]})
        out.append({"role": msg["role"], "content": parts})
    return out, images, before


def _dataset_record(obj: dict, where: str) -> tuple[list[dict], list[str], list[str]]:
    """accuracy.py's {"prompt": "text <image> text", "images": [...], "system": ...}, rendered as
    that harness sends it."""
    prompt, images, system = obj["prompt"], obj.get("images", []), obj.get("system")
    if not isinstance(prompt, str) or not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise ValueError(f"{where}: prompt must be a string and images a list of strings")
    pieces = prompt.split(IMAGE_MARKER)
    if len(pieces) - 1 != len(images):
        raise ValueError(f"{where}: the prompt has {len(pieces) - 1} {IMAGE_MARKER} marker(s), "
                         f"{len(images)} image(s)")
    content: list[dict] = []
    for i, text in enumerate(pieces):
        if text:
            content.append({"type": "text", "text": text})
        if i < len(images):
            content.append({"type": "image_url", "image_url": {"url": images[i]}})
    messages = ([{"role": "system", "content": system}] if system is not None else [])
    return _chat_request({"messages": messages + [{"role": "user", "content": content}]}, where)


def load_requests(path: str | Path) -> tuple[list[CalibRequest], int]:
    """(requests with at least one image, number of requests without one)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"requests file not found: {path}")
    found, no_image = [], 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e})") from None
        if isinstance(obj, dict) and "messages" in obj:
            messages, images, before = _chat_request(obj, where)
        elif isinstance(obj, dict) and "prompt" in obj:
            messages, images, before = _dataset_record(obj, where)
        else:
            raise ValueError(f"{where}: expected an object with 'messages' (chat request) or 'prompt' and "
                             f"'images' (accuracy dataset), got {line[:80]!r}")
        if not images:
            no_image += 1
            continue
        images = [_resolve_image(ref, path.parent, where) for ref in images]
        found.append(CalibRequest(n, messages, images, before))
    return found, no_image


def _resolve_image(ref: str, base: Path, where: str) -> str:
    if ref.startswith("data:"):
        return ref
    if ref.startswith(("http://", "https://")):
        raise ValueError(f"{where}: calibrate does not download images ({ref[:60]}); save it and give a file path "
                         "or a data URL")
    p = Path(ref[len("file://"):] if ref.startswith("file://") else ref)
    p = p if p.is_absolute() else base / p
    if not p.is_file():
        raise ValueError(f"{where}: image file not found: {p}")
    return str(p)


def _open_image(ref: str):
    from PIL import Image

    if ref.startswith("data:"):
        head, _, payload = ref.partition(",")
        if ";base64" not in head or not payload:
            raise ValueError(f"not a base64 image data URL: {ref[:40]}...")
        try:
            data = base64.b64decode(payload, validate=False)
        except binascii.Error as e:
            raise ValueError(f"bad base64 in an image data URL: {e}") from None
        img = Image.open(io.BytesIO(data))
    else:
        img = Image.open(ref)
    return img.convert("RGB")


# ----- donor text ---------------------------------------------------------------------------------

def content_token_mask(tokenizer, prefix_text: str, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) of the rendered text before the first image: mask marks the tokens that lie
    wholly inside one of `texts` (message contents, found in order) — not template tokens."""
    enc = tokenizer(prefix_text, return_offsets_mapping=True, add_special_tokens=False)
    prefix_ids = np.asarray(enc["input_ids"], dtype=np.int64)
    spans, cursor = [], 0
    for t in texts:
        if not t:
            continue
        at = prefix_text.find(t, cursor)
        if at < 0:
            continue  # the template changed it; leave that text as it is
        spans.append((at, at + len(t)))
        cursor = at + len(t)
    special = set(tokenizer.all_special_ids)
    mask = np.zeros(len(prefix_ids), dtype=bool)
    for i, ((a, b), tid) in enumerate(zip(enc["offset_mapping"], prefix_ids)):
        mask[i] = tid not in special and b > a and any(s <= a and b <= e for s, e in spans)
    return prefix_ids, mask


def donor_ids(ids: np.ndarray, mask: np.ndarray, pool: np.ndarray, rng: np.random.Generator,
              vocab_regular: int) -> np.ndarray:
    """`ids` with its masked tokens replaced by a window (seeded offset, wrapping) of `pool`; random
    regular-vocabulary tokens when the pool is empty or would give back the same text."""
    out = ids.copy()
    n = int(mask.sum())
    if len(pool):
        start = int(rng.integers(len(pool)))
        out[mask] = pool[(start + np.arange(n)) % len(pool)]
    if not len(pool) or np.array_equal(out[mask], ids[mask]):
        out[mask] = rng.integers(vocab_regular, size=n)
    return out


# ----- model runs ---------------------------------------------------------------------------------

@dataclass
class Prepared:
    target: torch.Tensor  # [T] input ids
    donor: torch.Tensor  # [T]
    image_embeds: torch.Tensor  # [n_image_tokens, hidden]
    position_ids: torch.Tensor  # [3, 1, T] M-RoPE positions (equal for target and donor)
    image_mask: torch.Tensor  # [T] bool


def text_layers(model) -> list[torch.nn.Module]:
    return list(model.model.language_model.layers)


@contextlib.contextmanager
def kv_projection_hooks(model, make_hook) -> Iterator[None]:
    """make_hook(layer, 'k'|'v') as a forward hook on every text layer's K and V projection, for the
    block (also used by benchmarks/tiny_vlm/kv_splice.py)."""
    handles = [proj.register_forward_hook(make_hook(i, w)) for i, layer in enumerate(text_layers(model))
               for w, proj in (("k", layer.self_attn.k_proj), ("v", layer.self_attn.v_proj))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _embeds(model, ids: torch.Tensor, prep: Prepared, batch: int) -> torch.Tensor:
    """[batch, T, hidden]: token embeddings with the image embeddings at the image tokens."""
    emb = model.get_input_embeddings()(ids).clone()
    emb[prep.image_mask] = prep.image_embeds.to(emb.dtype)
    return emb.unsqueeze(0).expand(batch, -1, -1)


def _last_logits(model, embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """[B, vocab] float32 logits at the last position (the vocab head on every position would be
    most of the memory for a long prompt)."""
    out = model.model.language_model(inputs_embeds=embeds, position_ids=position_ids, use_cache=False)
    return model.lm_head(out.last_hidden_state[:, -1]).float()


@torch.no_grad()
def record_donor_kv(model, prep: Prepared) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, 'k'|'v') -> [n_image_tokens, kv_dim]: the donor's image-token projections."""
    store: dict[tuple[int, str], torch.Tensor] = {}

    def hook(layer: int, which: str):
        def fn(_m, _i, output):
            store[(layer, which)] = output[0, prep.image_mask].clone()
        return fn

    with kv_projection_hooks(model, hook):
        _last_logits(model, _embeds(model, prep.donor, prep, 1), prep.position_ids)
    return store


@torch.no_grad()
def layer_kls(model, prep: Prepared, donor_kv: dict, layer_batch: int) -> np.ndarray:
    """[L] KL(p_full || p_l) at the last prompt position, p_l with layer l's image K/V from the donor."""
    n_layers = len(text_layers(model))
    kls = np.zeros(n_layers)
    for lo in range(0, n_layers, layer_batch):
        chunk = list(range(lo, min(n_layers, lo + layer_batch)))
        row = {l: 1 + i for i, l in enumerate(chunk)}  # row 0: the unperturbed target

        def hook(layer: int, which: str):
            def fn(_m, _i, output):
                if layer in row:
                    output[row[layer], prep.image_mask] = donor_kv[(layer, which)].to(output.dtype)
                return output
            return fn

        b = 1 + len(chunk)
        with kv_projection_hooks(model, hook):
            logits = _last_logits(model, _embeds(model, prep.target, prep, b), prep.position_ids.expand(-1, b, -1))
        logp = torch.log_softmax(logits.double(), dim=-1)
        kl = (logp[0].exp() * (logp[0] - logp[1:])).sum(-1).clamp_min(0.0)
        kls[chunk] = kl.cpu().numpy()
    return kls


# ----- driver -------------------------------------------------------------------------------------

class Calibrator:
    """The model and processor of one checkpoint, and the per-request measurement."""

    def __init__(self, model_path: str, device: str, dtype: torch.dtype) -> None:
        from transformers import AutoConfig, AutoProcessor, Qwen2_5_VLForConditionalGeneration

        config = AutoConfig.from_pretrained(model_path)
        if config.model_type != "qwen2_5_vl":
            raise ValueError(f"{model_path}: expected a Qwen2.5-VL checkpoint (model_type 'qwen2_5_vl'), "
                             f"got {config.model_type!r}")
        self.processor = AutoProcessor.from_pretrained(model_path)
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_path, dtype=dtype).to(device).eval()
        self.device = torch.device(device)
        self.image_token_id = self.model.config.image_token_id
        self.vision_start_id = self.model.config.vision_start_token_id
        self.num_layers = len(text_layers(self.model))
        tok = self.processor.tokenizer
        special = [i for i in tok.all_special_ids if i is not None]
        self.vocab_regular = min(special) if special else len(tok)

    def render(self, req: CalibRequest) -> str:
        """The prompt text as the server renders the request (the checkpoint's chat template)."""
        return self.processor.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)

    def content_tokens(self, req: CalibRequest) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask) of the prompt before its first image's vision-start token; mask marks the
        message-text tokens a donor replaces. Text only: no image is decoded."""
        text = self.render(req)
        start = self.processor.tokenizer.convert_ids_to_tokens(self.vision_start_id)
        if start not in text:
            raise ValueError(f"the chat template rendered no {start} for the request's image")
        return content_token_mask(self.processor.tokenizer, text[:text.index(start)], req.texts_before_image)

    def encode(self, req: CalibRequest, prefix_ids: np.ndarray, prefix_mask: np.ndarray) -> tuple[dict, np.ndarray]:
        """(processor output, [T] content mask): the request with its images processed."""
        images = [_open_image(ref) for ref in req.images]
        enc = self.processor(text=[self.render(req)], images=images, return_tensors="pt")
        ids = enc["input_ids"][0].numpy()
        n = len(prefix_ids)
        if not (np.array_equal(ids[:n], prefix_ids) and n < len(ids) and ids[n] == self.vision_start_id):
            raise ValueError("the text before the first image does not tokenise on its own as in the whole prompt")
        mask = np.zeros(len(ids), dtype=bool)
        mask[:n] = prefix_mask
        return enc, mask

    @torch.no_grad()
    def prepare(self, enc: dict, content_mask: np.ndarray, pool: np.ndarray, rng: np.random.Generator) -> Prepared:
        ids = enc["input_ids"][0]
        image_mask = ids == self.image_token_id
        grid = enc["image_grid_thw"].to(self.device)
        vis = self.model.model.get_image_features(enc["pixel_values"].to(self.device), grid).pooler_output
        image_embeds = torch.cat(list(vis), dim=0)
        if image_embeds.shape[0] != int(image_mask.sum()):
            raise AssertionError(f"{image_embeds.shape[0]=} image embeddings for {int(image_mask.sum())=} image tokens")
        ids_d = ids.to(self.device)[None]
        pos, _ = self.model.model.get_rope_index(ids_d, mm_token_type_ids=image_mask.to(self.device, torch.int)[None],
                                                 image_grid_thw=grid)
        donor = donor_ids(ids.numpy(), content_mask, pool, rng, self.vocab_regular)
        return Prepared(ids.to(self.device), torch.from_numpy(donor).to(self.device), image_embeds, pos,
                        image_mask.to(self.device))


def calibrate(model_path: str, requests: list[CalibRequest], device: str, dtype: torch.dtype,
              layer_batch: int = 0, seed: int = DONOR_SEED,
              batch_tokens: int = DEFAULT_BATCH_TOKENS) -> tuple[LayerProfile, np.ndarray]:
    """(profile, [requests, L] per-request KL). `requests` must be non-empty. layer_batch: perturbed
    layers per forward (0: as many as fit in batch_tokens, at least one)."""
    if not requests:
        raise ValueError("no requests with an image to calibrate on")
    cal = Calibrator(model_path, device, dtype)
    # Pass 1, text only: which tokens each donor varies, and the pool of text it draws from. Images are
    # processed one request at a time in pass 2 (a 4K image's pixels are ~200 MB in fp32).
    usable = []
    for req in requests:
        try:
            prefix_ids, prefix_mask = cal.content_tokens(req)
        except ValueError as e:
            _log(f"line {req.line} skipped: {e}")
            continue
        if not prefix_mask.any():
            _log(f"line {req.line} skipped: no message text before its first image for the donor to change")
            continue
        usable.append((req, prefix_ids, prefix_mask))
    if not usable:
        raise ValueError("no request has message text before its first image; calibrate varies that text "
                         "(add a system prompt or user text before the image)")
    streams = [ids[m] for _, ids, m in usable]
    rng = np.random.default_rng(seed)
    rows = []
    for i, (req, prefix_ids, prefix_mask) in enumerate(usable):
        t0 = time.perf_counter()
        try:
            enc, mask = cal.encode(req, prefix_ids, prefix_mask)
        except ValueError as e:
            _log(f"line {req.line} skipped: {e}")
            continue
        others = [s for j, s in enumerate(streams) if j != i]
        pool = np.concatenate(others) if others else rng.permutation(streams[i])
        prep = cal.prepare(enc, mask, pool, rng)
        per_forward = layer_batch or max(1, batch_tokens // prep.target.numel() - 1)
        rows.append(layer_kls(cal.model, prep, record_donor_kv(cal.model, prep), per_forward))
        _log(f"request {i + 1}/{len(usable)} (line {req.line}): {prep.target.numel()} tokens, "
             f"{int(prep.image_mask.sum())} image tokens, {int(mask.sum())} text tokens varied, "
             f"{time.perf_counter() - t0:.2f} s")
    if not rows:
        raise ValueError("every request with an image was skipped (see the log above)")
    per_request = np.stack(rows)
    profile = LayerProfile(tuple(float(x) for x in per_request.mean(0)), METRIC, model=str(model_path),
                           samples=len(rows))
    return profile, per_request


def format_table(profile: LayerProfile, mean_ratio: float) -> str:
    r = layer_ratios(profile, mean_ratio)
    lines = [f"layer  sensitivity ({profile.metric})  r_l at mean {mean_ratio:g}",
             *(f"{l:5d}  {s:26.6g}  {x:15.4f}" for l, (s, x) in enumerate(zip(profile.sensitivity, r))),
             f"(mean r_l = {sum(r) / len(r):.4f}: the share of reused image tokens recomputed, averaged over layers;",
             f" layer 0 is exact by construction, so its {profile.sensitivity[0]:.3g} is this measurement's rounding floor)"]
    return "\n".join(lines)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vlcache_sglang.calibrate",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Qwen2.5-VL checkpoint directory (weights, config, processor)")
    p.add_argument("--requests", required=True, help="JSONL of chat requests or accuracy-dataset records")
    p.add_argument("--out", required=True, help="profile JSON to write (load it with --vlcache-profile)")
    p.add_argument("--device", default=_default_device(), help="torch device (default: cuda if available)")
    p.add_argument("--dtype", choices=["auto", *_DTYPES], default="auto",
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--max-requests", type=int, default=None, help="use the first N requests that have an image")
    p.add_argument("--batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS,
                   help="most tokens (rows x prompt length) per forward; lower it if memory runs out")
    p.add_argument("--layer-batch", type=int, default=0,
                   help="perturbed-layer runs per forward, overriding --batch-tokens (0: from --batch-tokens)")
    p.add_argument("--seed", type=int, default=DONOR_SEED, help="seed of the donor text")
    p.add_argument("--table-ratio", type=float, default=0.05, help="mean ratio of the r_l column in the table")
    args = p.parse_args(argv)
    if args.max_requests is not None and args.max_requests < 1:
        p.error(f"--max-requests must be >= 1, got {args.max_requests}")
    if args.batch_tokens < 1:
        p.error(f"--batch-tokens must be >= 1, got {args.batch_tokens}")
    if args.layer_batch < 0:
        p.error(f"--layer-batch must be >= 0, got {args.layer_batch}")
    if not 0.0 <= args.table_ratio <= 1.0:
        p.error(f"--table-ratio must be in [0, 1], got {args.table_ratio}")
    dtype = _DTYPES.get(args.dtype) or (torch.bfloat16 if str(args.device).startswith("cuda") else torch.float32)
    try:
        requests, no_image = load_requests(args.requests)
        if not requests:
            raise ValueError(f"none of the requests in {args.requests} has an image ({no_image} without one); "
                             "calibrate measures image-KV reuse and needs requests with image_url parts")
        requests = requests[:args.max_requests] if args.max_requests else requests
        _log(f"{len(requests)} usable requests with images from {args.requests} ({no_image} without an image skipped)")
        t0 = time.perf_counter()
        profile, _ = calibrate(args.model, requests, args.device, dtype, args.layer_batch, args.seed,
                                 args.batch_tokens)
    except ValueError as e:
        raise SystemExit(f"calibrate: error: {e}") from None
    save_layer_profile(profile, args.out)
    print(format_table(profile, args.table_ratio))
    _log(f"wrote {args.out}: {profile.num_layers} layers, {profile.samples} requests, "
         f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
