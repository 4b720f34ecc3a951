"""Routing keys for image affinity across replicas: which replica should see a request again.

A recurring image only helps on the replica that stored its KV. SGLang's router (`smg`, formerly
`sglang-router`) cannot see images: its `cache_aware` policy matches the *text* of a request
(`extract_text_for_routing` skips image parts), so every request with the same system prompt looks
alike to it, whatever its images. What the router does honour is the `X-SMG-Routing-Key` header:
`--policy manual` pins each key to one worker (new keys go to the least loaded one with
`--assignment-mode min_load`), `--policy consistent_hashing` hashes it onto a ring, and
`--routing-key-override` pins keyed requests on any other policy. SGLang 0.5.16 passes the same
header through to the replica (`GenerateReqInput.routing_key`, the `routing-key` schedule policy).
So a client (or the proxy in front of the router) sends that header, computed here from the body.

What the key is: HMAC-SHA256 over the request's cache namespace and the identity of its *first*
image, in prompt order. The first image because a conversation keeps it as its history grows, so
every turn lands where the earlier turns stored their images; a request's other images are stored
on the same replica and so gather where they co-occur. For multi-image requests whose order varies,
`pick="min"` keys the set instead (the smallest per-image key, a MinHash). Identity: the decoded bytes of an inline
image (the server keys raw bytes too, so two encodings of one image route alike), the URL or path
string otherwise (the router must not fetch or read anything).

Why the namespace is in the key: it is SGLang's `extra_key` (cache_salt ‖ extra_key), the same
namespace the replicas key image KV under. Without it, tenant B's request for an image would follow
tenant A's to the replica that stored it, and B's placement (and queueing there) would depend on
what A sent. With it, two tenants' keys for one image are unrelated, as their caches are.

Why keyed: replicas log the header (SGLang whitelists it in its request logger). An unkeyed digest
of (salt, bytes) would let anyone with the logs and a candidate image confirm who sent it; under a
deployment secret the key says nothing without that secret. The secret is not the replicas' image
key secret (that one is per process and never leaves the tokenizer); any value shared by the
clients that route works.

Not `mm_hashes`: SGLang accepts client item hashes, but the router never reads them, and vlcache
never reuses or stores items whose hashes a client chose (README "Safety").
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import sys
from typing import Any, Iterator, Mapping, Optional, Union

from vlcache_sglang.image_key import decode_base64
from vlcache_sglang.local_images import local_image_path

ROUTING_KEY_HEADER = "X-SMG-Routing-Key"
# Domain separation when no deployment secret is given (keys are then only as private as the salt).
_DEFAULT_SECRET = b"vlcache-sglang routing key v1"
KEY_HEX_CHARS = 32  # 128 bits: collisions between images only cost a co-location, never a wrong answer

ImageEntry = Union[str, bytes, bytearray, memoryview]


def request_namespace(body: Mapping[str, Any]) -> Optional[str]:
    """The cache namespace SGLang gives the request: cache_salt ‖ extra_key, None when neither is
    set (as `OpenAIServingBase._compute_extra_key` builds `extra_key` in 0.5.16)."""
    parts = []
    for name in ("cache_salt", "extra_key"):
        value = body.get(name)
        if value:
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a string, got {type(value).__name__} (SGLang refuses it too)")
            parts.append(value)
    return "".join(parts) if parts else None


def request_images(body: Mapping[str, Any]) -> Iterator[ImageEntry]:
    """The request's images in prompt order: OpenAI chat `messages` (image_url parts) or the native
    /generate `image_data` (one entry or a list)."""
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, list):
            continue  # a plain-text message
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, Mapping) else url
                if isinstance(url, str):
                    yield url
    data = body.get("image_data")
    for entry in (data if isinstance(data, list) else [data] if data is not None else []):
        if isinstance(entry, Mapping):  # SGLang's ImageData {"url": ...}
            entry = entry.get("url")
        if isinstance(entry, (str, bytes, bytearray, memoryview)):
            yield entry


def image_identity(entry: ImageEntry) -> bytes:
    """What identifies an image for routing: a digest of its decoded bytes when inline (raw bytes,
    base64 or a data URL), else the URL or path itself (never fetched, never read)."""
    if isinstance(entry, (bytes, bytearray, memoryview)):
        return b"bytes:" + hashlib.sha256(entry).digest()
    # The same reading of a string as the tokenizer's (processor_patch.key_of): data URL, else URL or
    # local path, else base64.
    if not entry.startswith("data:") and ("://" in entry or local_image_path(entry) is not None):
        return b"url:" + entry.encode("utf-8", "surrogatepass")
    try:
        return b"bytes:" + hashlib.sha256(decode_base64(entry)).digest()
    except ValueError:  # the replica will answer 400; route it anyway, by its text
        return b"text:" + hashlib.sha256(entry.encode("utf-8", "surrogatepass")).digest()


def _image_mac(key: bytes, namespace: Optional[str], entry: ImageEntry) -> str:
    mac = hmac.new(key, digestmod=hashlib.sha256)
    ns = b"\x00" if namespace is None else b"\x01" + namespace.encode("utf-8", "surrogatepass")
    # Length-prefixed, so no (namespace, identity) pair aliases another.
    for part in (ns, image_identity(entry)):
        mac.update(len(part).to_bytes(8, "little"))
        mac.update(part)
    return mac.hexdigest()[:KEY_HEX_CHARS]


PICKS = ("first", "min")


def routing_key(body: Mapping[str, Any], secret: Optional[bytes] = None, pick: str = "first") -> Optional[str]:
    """The routing key of a request body, or None when it has no image (route it by load).

    pick "first": the first image's key (conversations: the first image stays as history grows).
    pick "min": the smallest of the images' keys, a MinHash of the request's image set: the same set
    in any order routes alike, and two sets collide with probability their Jaccard similarity (multi-
    image requests in shuffled order; a new image in a long history moves it with probability
    1/(images+1))."""
    if pick not in PICKS:
        raise ValueError(f"pick must be one of {PICKS}, got {pick!r}")
    images = request_images(body)
    if pick == "first":
        first = next(images, None)
        images = iter(() if first is None else (first,))
    key, ns = secret or _DEFAULT_SECRET, request_namespace(body)
    return min((_image_mac(key, ns, entry) for entry in images), default=None)


def routing_headers(body: Mapping[str, Any], secret: Optional[bytes] = None,
                    pick: str = "first") -> dict[str, str]:
    """{ROUTING_KEY_HEADER: key} for a request with an image, {} otherwise: merge into the headers
    of the POST to the router."""
    key = routing_key(body, secret, pick)
    return {} if key is None else {ROUTING_KEY_HEADER: key}


def main(argv: Optional[list[str]] = None) -> None:
    """`python -m vlcache_sglang.routing_key [BODY.json] [--secret-file F]`: the header line of a
    request body (stdin without BODY), for curl and shell clients; nothing when it has no image."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("body", nargs="?", help="JSON request body (default: stdin)")
    p.add_argument("--secret-file", help="the deployment's routing secret (its bytes)")
    p.add_argument("--pick", choices=PICKS, default="first", help="which image keys the request (see routing_key)")
    args = p.parse_args(argv)
    body = json.load(open(args.body) if args.body else sys.stdin)
    secret = open(args.secret_file, "rb").read() if args.secret_file else None
    for name, value in routing_headers(body, secret, args.pick).items():
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
