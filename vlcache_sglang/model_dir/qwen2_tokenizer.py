"""The Qwen2 byte-level BPE tokenizer, rebuilt from the `qwen.tiktoken` ranks PyPI packages ship."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer, normalizers
from transformers.convert_slow_tokenizer import TikTokenConverter

# Qwen2's pre-tokenizer split pattern (same as the tokenizer.json of every Qwen2/2.5 model).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_REGULAR_TOKENS = 151_643
# Added after the regular ranks, in this order, so they get ids 151643..151664.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)


def qwen_tiktoken_path() -> Path:
    """Path of the qwen.tiktoken rank file shipped by the `dashscope` package."""
    path = Path(str(resources.files("dashscope") / "resources" / "qwen.tiktoken"))
    if not path.is_file():
        raise FileNotFoundError(f"qwen.tiktoken not found at {path}; reinstall dashscope==2.0.2")
    return path


def build_qwen2_tokenizer(tiktoken_file: Path | None = None) -> Tokenizer:
    """A `tokenizers.Tokenizer` identical in ids to Qwen2's tokenizer.json."""
    converter = TikTokenConverter(
        vocab_file=str(tiktoken_file or qwen_tiktoken_path()),
        pattern=QWEN2_SPLIT_PATTERN,
        extra_special_tokens=list(SPECIAL_TOKENS),
    )
    tok = converter.converted()
    tok.normalizer = normalizers.NFC()
    base = tok.get_vocab_size(with_added_tokens=False)
    if base != NUM_REGULAR_TOKENS:
        raise ValueError(f"expected {NUM_REGULAR_TOKENS} regular ranks in qwen.tiktoken, got {base}")
    first = tok.token_to_id(SPECIAL_TOKENS[0])
    if first != NUM_REGULAR_TOKENS:
        raise ValueError(f"special tokens must start at id {NUM_REGULAR_TOKENS}, got {first}")
    return tok
