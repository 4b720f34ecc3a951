import base64
import json

import pytest

from vlcache_sglang.routing_key import (
    KEY_HEX_CHARS,
    ROUTING_KEY_HEADER,
    image_identity,
    request_images,
    request_namespace,
    main,
    routing_headers,
    routing_key,
)

PNG_A = b"\x89PNG\r\n\x1a\n" + bytes(range(200))
PNG_B = b"\x89PNG\r\n\x1a\n" + bytes(range(1, 201))


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def chat(*urls: str, text: str = "Describe.", **extra) -> dict:
    content = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"model": "default", "messages": [{"role": "system", "content": "You are careful."},
                                             {"role": "user", "content": content}], **extra}


def test_same_first_image_same_key_whatever_the_text_and_later_images():
    a = routing_key(chat(data_url(PNG_A), text="one prompt"))
    assert a == routing_key(chat(data_url(PNG_A), data_url(PNG_B), text="another, longer prompt"))
    assert len(a) == KEY_HEX_CHARS and int(a, 16) >= 0  # plain hex: a valid header value


def test_other_first_image_other_key():
    assert routing_key(chat(data_url(PNG_A), data_url(PNG_B))) != routing_key(chat(data_url(PNG_B), data_url(PNG_A)))


def test_key_follows_the_bytes_not_their_encoding():
    # The replicas key raw bytes: a data URL with another MIME type, a bare base64 string and the
    # raw bytes on /generate are one image.
    key = routing_key(chat(data_url(PNG_A)))
    assert routing_key(chat(data_url(PNG_A, "image/jpeg"))) == key
    assert routing_key(chat(base64.b64encode(PNG_A).decode())) == key
    assert routing_key({"text": "x", "image_data": PNG_A}) == key
    assert routing_key({"text": "x", "image_data": [{"url": data_url(PNG_A)}]}) == key


def test_the_salt_is_part_of_the_key():
    body = chat(data_url(PNG_A))
    keys = {routing_key(body), routing_key({**body, "cache_salt": "tenant-a"}),
            routing_key({**body, "cache_salt": "tenant-b"}), routing_key({**body, "extra_key": "tenant-a"})}
    assert len(keys) == 3  # none, a, b; extra_key "tenant-a" is SGLang's namespace "tenant-a" too
    # SGLang concatenates cache_salt and extra_key: the same namespace routes alike.
    split = {**body, "cache_salt": "ten", "extra_key": "ant-a"}
    assert routing_key(split) == routing_key({**body, "cache_salt": "tenant-a"})


def test_namespace_mirrors_sglang():
    assert request_namespace({}) is None
    assert request_namespace({"cache_salt": "", "extra_key": None}) is None
    assert request_namespace({"cache_salt": "s", "extra_key": "e"}) == "se"
    with pytest.raises(TypeError, match="cache_salt must be a string"):
        request_namespace({"cache_salt": ["a"]})


def test_the_secret_changes_every_key():
    body = chat(data_url(PNG_A), cache_salt="tenant-a")
    assert routing_key(body, b"deployment secret") != routing_key(body)
    assert routing_key(body, b"deployment secret") == routing_key(body, b"deployment secret")


def test_no_image_no_key_and_no_header():
    assert routing_key({"messages": [{"role": "user", "content": "text only"}]}) is None
    assert routing_key({"text": "hello"}) is None
    assert routing_headers({"text": "hello"}) == {}
    assert routing_headers(chat(data_url(PNG_A))) == {ROUTING_KEY_HEADER: routing_key(chat(data_url(PNG_A)))}


def test_urls_and_paths_are_keyed_by_their_text_and_never_read(tmp_path):
    missing = str(tmp_path / "not-there.png")  # reading it would raise
    assert image_identity(missing).startswith(b"url:")
    assert image_identity("file://" + missing).startswith(b"url:")
    assert image_identity("https://example.invalid/cat.png").startswith(b"url:")
    assert routing_key(chat("https://example.invalid/cat.png")) != routing_key(chat("https://example.invalid/dog.png"))


def test_invalid_base64_still_routes():
    # The replica answers 400; the router still needs a key, and it must not raise in the client.
    assert image_identity("data:image/png;base64,@@not base64@@").startswith(b"text:")
    assert routing_key(chat("data:image/png;base64,@@not base64@@")) is not None


def test_images_in_prompt_order_across_messages():
    body = {"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://h/1.png"}}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "and"},
                                     {"type": "image_url", "image_url": {"url": "https://h/2.png"}}]}]}
    assert list(request_images(body)) == ["https://h/1.png", "https://h/2.png"]
    # A later turn of the conversation keeps the first image, so it keeps its replica.
    assert routing_key(body) == routing_key({"messages": body["messages"][:1]})


def test_command_line_prints_the_header(tmp_path, capsys):
    body = chat(data_url(PNG_A), cache_salt="tenant-a")
    (tmp_path / "body.json").write_text(json.dumps(body))
    (tmp_path / "secret").write_bytes(b"s3")
    main([str(tmp_path / "body.json"), "--secret-file", str(tmp_path / "secret")])
    assert capsys.readouterr().out == f"{ROUTING_KEY_HEADER}: {routing_key(body, b's3')}\n"
    (tmp_path / "text.json").write_text('{"messages": [{"role": "user", "content": "hi"}]}')
    main([str(tmp_path / "text.json")])
    assert capsys.readouterr().out == ""


def test_min_pick_keys_the_image_set_in_any_order():
    a, b, c = data_url(PNG_A), data_url(PNG_B), "https://h/3.png"
    key = routing_key(chat(a, b, c), pick="min")
    assert routing_key(chat(c, a, b), pick="min") == key == routing_key(chat(b, c, a), pick="min")
    singles = {routing_key(chat(x)) for x in (a, b, c)}
    assert key in singles, "the set's key is one of its images' keys (so subsets often agree)"
    assert routing_key(chat(c, a, b)) != routing_key(chat(a, b, c)), "first: the order matters"
    assert routing_key(chat(a, b, c, cache_salt="t"), pick="min") != key, "the salt is in every image's key"
    assert routing_key({"text": "no image"}, pick="min") is None
    with pytest.raises(ValueError, match="pick must be one of"):
        routing_key(chat(a), pick="last")
