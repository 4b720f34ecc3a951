"""Prompt layout and token ids, exactly as SGLang's chat-completions endpoint renders a request.

A user turn is `filler` (random chat-history text, varying length) + question + image + "Answer:".
SGLang renders an OpenAI message [text, image_url, text] with the checkpoint's Jinja chat template
(Qwen2.5-VL has no built-in conversation template there): the default system turn, the text parts
verbatim and `<|vision_start|><|image_pad|><|vision_end|>` for the image, whose pad the processor
expands to one token per merged 28-px patch. The tests check `render_chat` against the template.
"""

from __future__ import annotations

import numpy as np

SYSTEM = "You are a helpful assistant."
IMAGE_MARKER = "<image>"  # where accuracy.py puts the image in a dataset prompt
ANSWER_CUE = "Answer:"

IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD = 151644, 151645, 151652, 151653, 151655
PAD_ID = 151643  # <|endoftext|>: right padding in training batches (never attended: causal)

# Chat-history filler: plain words, so its length in tokens is close to its length in words.
_WORDS = (
    "the a we you they it this that my your our some many few old new good bad big small long short "
    "day night week morning evening plan trip meeting report budget garden kitchen movie book song "
    "weather train office project idea question answer story picture table window door street city "
    "friend family team teacher doctor driver said asked told wrote thought liked wanted needed "
    "moved opened closed started finished visited called found lost kept made took gave saw heard "
    "about after before during with without under over near from into again later soon today "
    "yesterday tomorrow really quite very maybe also still just only"
).split()


def filler_text(rng: np.random.Generator, max_words: int) -> str:
    """0..max_words (uniform) words of chat-history-like text; '' for 0."""
    return filler_of_length(rng, int(rng.integers(0, max_words + 1)))


def filler_of_length(rng: np.random.Generator, n: int) -> str:
    """n words of chat-history-like text in sentences; '' for 0."""
    if n == 0:
        return ""
    words = [_WORDS[i] for i in rng.integers(len(_WORDS), size=n)]
    sentences, i = [], 0
    while i < n:
        k = int(rng.integers(4, 11))
        chunk = words[i:i + k]
        sentences.append(" ".join(chunk).capitalize() + ".")
        i += k
    return " ".join(sentences)


def user_text(filler: str, question: str) -> tuple[str, str]:
    """(text before the image, text after it). No whitespace at the image boundaries, so a client
    that strips text parts sends the same tokens."""
    before = f"{filler}\n{question}" if filler else question
    return before, ANSWER_CUE


def dataset_prompt(before: str, after: str) -> str:
    """The accuracy.py dataset form: text with an `<image>` marker."""
    return f"{before}{IMAGE_MARKER}{after}"


def render_chat(before: str, after: str) -> str:
    """The prompt text SGLang builds for messages=[user: [text, image_url, text]] (generation prompt
    included), with the image still one `<|image_pad|>`."""
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{before}"
            f"<|vision_start|><|image_pad|><|vision_end|>{after}<|im_end|>\n<|im_start|>assistant\n")


def expand_image_pad(ids: list[int], n_image_tokens: int) -> list[int]:
    """Replace the single <|image_pad|> with one per image token (what the processor does)."""
    if ids.count(IMAGE_PAD) != 1:
        raise ValueError(f"expected one <|image_pad|> in the prompt, found {ids.count(IMAGE_PAD)}")
    i = ids.index(IMAGE_PAD)
    return ids[:i] + [IMAGE_PAD] * n_image_tokens + ids[i + 1:]


def mrope_positions(ids: list[int] | np.ndarray, merged_hw: tuple[int, int]) -> np.ndarray:
    """[3, len(ids)] M-RoPE positions of a sequence with one image of merged grid (h, w):
    text counts up on all three axes; image token (r, c) sits at start + (0, r, c); text after the
    image resumes at start + max(h, w). Same as Qwen2.5-VL's get_rope_index (tested)."""
    ids = np.asarray(ids)
    img = np.flatnonzero(ids == IMAGE_PAD)
    h, w = merged_hw
    if len(img) != h * w or (len(img) and img[-1] - img[0] + 1 != len(img)):
        raise ValueError(f"expected one run of {h * w} image tokens, found {len(img)}")
    pos = np.broadcast_to(np.arange(len(ids)), (3, len(ids))).copy()
    if len(img) == 0:
        return pos
    s, e = int(img[0]), int(img[-1]) + 1
    r, c = np.divmod(np.arange(h * w), w)
    pos[0, s:e] = s
    pos[1, s:e] = s + r
    pos[2, s:e] = s + c
    pos[:, e:] = s + max(h, w) + np.arange(len(ids) - e)
    return pos
