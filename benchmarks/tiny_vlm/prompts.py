"""Prompt layout and token ids, exactly as SGLang's chat-completions endpoint renders a request.

Regime A's user turn is `filler` (random chat-history text, varying length) + question + image +
"Answer:". SGLang renders an OpenAI message [text, image_url, text] with the checkpoint's Jinja chat
template (Qwen2.5-VL has no built-in conversation template there): the default system turn, the text
parts verbatim and `<|vision_start|><|image_pad|><|vision_end|>` for the image, whose pad the processor
expands to one token per merged 28-px patch. `render_messages` is the general form (a system prompt,
earlier turns, several images: regimes B and multi). The tests check both against the template.
"""

from __future__ import annotations

import numpy as np

SYSTEM = "You are a helpful assistant."
IMAGE_MARKER = "<image>"  # where accuracy.py puts the image in a dataset prompt
ANSWER_CUE = "Answer:"

# Regime B's system prompts: the context before the image differs from one request to the next.
SYSTEM_PROMPTS = (
    SYSTEM,
    "You are a concise assistant. Answer with one word.",
    "You are a visual assistant that reads pictures of coloured grids.",
    "You help people describe images. Keep every answer short.",
    "You are a careful assistant. Look at the picture before answering.",
    "You answer questions about pictures for a small team.",
    "You are a friendly helper in a chat about images and colours.",
    "You are an assistant. Reply with the answer only, no explanation.",
)
FAVOURITE_QUESTION = "How many cells have my favourite colour?"

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


def image_labels(n: int) -> tuple[str, ...]:
    """The text before each of n images ("Image 1:", ...), as Qwen2-VL's template writes "Picture 1: "
    with add_vision_id: a question can then name an image by its ordinal. No trailing space (user_text)."""
    return tuple(f"Image {i}:" for i in range(1, n + 1))


def dataset_prompt(before: str, after: str) -> str:
    """The accuracy.py dataset form: text with an `<image>` marker."""
    return f"{before}{IMAGE_MARKER}{after}"


def favourite_statement(colour: str, in_system: bool) -> str:
    return f"The user's favourite colour is {colour}." if in_system else f"My favourite colour is {colour}."


def chat_context(rng: np.random.Generator, max_filler_words: int, favourite: str | None,
                 max_turns: int = 2) -> tuple[str, tuple[tuple[str, str], ...]]:
    """(system prompt, earlier turns) before regime B's image: one of SYSTEM_PROMPTS, then 0..max_turns
    user/assistant exchanges of filler. `favourite` (a colour) is stated once, in the system prompt or in
    an earlier user turn: text before the image that a `ref` question after it needs."""
    system = SYSTEM_PROMPTS[int(rng.integers(len(SYSTEM_PROMPTS)))]
    turns = int(rng.integers(0, max_turns + 1))
    history: list[tuple[str, str]] = []
    for _ in range(turns):
        history.append(("user", filler_of_length(rng, int(rng.integers(1, max_filler_words + 1)))))
        history.append(("assistant", filler_of_length(rng, int(rng.integers(1, max(2, max_filler_words // 2) + 1)))))
    if favourite is not None:
        if not turns or rng.random() < 0.5:
            system = f"{system} {favourite_statement(favourite, True)}"
        else:
            i = 2 * int(rng.integers(turns))
            history[i] = ("user", f"{history[i][1]} {favourite_statement(favourite, False)}")
    return system, tuple(history)


IMAGE_TAGS = "<|vision_start|><|image_pad|><|vision_end|>"


def render_messages(system: str | None, history: tuple[tuple[str, str], ...] | list,
                    parts: tuple[str, ...] | list) -> str:
    """The prompt text SGLang builds for [system] + history (string contents) + one user turn whose
    content is parts[0], image, parts[1], ..., image, parts[-1] (len(parts) - 1 images), generation prompt
    included, each image still one `<|image_pad|>`. system None: the template's default system turn."""
    if len(parts) < 1:
        raise ValueError("parts must hold at least the text before the first image")
    turns = [("system", SYSTEM if system is None else system), *history]
    head = "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns)
    return f"{head}<|im_start|>user\n{IMAGE_TAGS.join(parts)}<|im_end|>\n<|im_start|>assistant\n"


def render_chat(before: str, after: str) -> str:
    """The prompt text SGLang builds for messages=[user: [text, image_url, text]] (generation prompt
    included), with the image still one `<|image_pad|>`."""
    return render_messages(None, (), (before, after))


def expand_image_pad(ids: list[int], n_image_tokens: int, n_images: int = 1) -> list[int]:
    """Replace each <|image_pad|> (n_images of them) with one per image token (what the processor does)."""
    if ids.count(IMAGE_PAD) != n_images:
        what = "one <|image_pad|>" if n_images == 1 else f"{n_images} <|image_pad|>"
        raise ValueError(f"expected {what} in the prompt, found {ids.count(IMAGE_PAD)}")
    out: list[int] = []
    for t in ids:
        out.extend([IMAGE_PAD] * n_image_tokens if t == IMAGE_PAD else [t])
    return out


def image_runs(ids: list[int] | np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of every run of consecutive <|image_pad|> tokens."""
    img = np.flatnonzero(np.asarray(ids) == IMAGE_PAD)
    if not len(img):
        return []
    cuts = np.flatnonzero(np.diff(img) != 1) + 1
    return [(int(r[0]), int(r[-1]) + 1) for r in np.split(img, cuts)]


def mrope_positions(ids: list[int] | np.ndarray, merged_hw: tuple[int, int], n_images: int | None = 1) -> np.ndarray:
    """[3, len(ids)] M-RoPE positions of a sequence with images of merged grid (h, w), each one run of
    h * w tokens (n_images of them; None: any number): text counts up on all three axes; image token
    (r, c) sits at start + (0, r, c); text after an image resumes at start + max(h, w). Same as
    Qwen2.5-VL's get_rope_index (tested)."""
    ids = np.asarray(ids)
    h, w = merged_hw
    runs = image_runs(ids)
    lens = [e - s for s, e in runs]
    if any(n != h * w for n in lens) or (n_images is not None and len(runs) != n_images):
        raise ValueError(f"expected {n_images if n_images is not None else 'any number of'} image(s), one run "
                         f"of {h * w} tokens each; found runs of {lens}")
    pos = np.zeros((3, len(ids)), dtype=np.int64)
    r, c = np.divmod(np.arange(h * w), w)
    nxt, prev = 0, 0  # next text position, end of the previous image run
    for s, e in runs:
        pos[:, prev:s] = nxt + np.arange(s - prev)
        start = nxt + s - prev
        pos[0, s:e] = start
        pos[1, s:e] = start + r
        pos[2, s:e] = start + c
        nxt, prev = start + max(h, w), e
    pos[:, prev:] = nxt + np.arange(len(ids) - prev)
    return pos
