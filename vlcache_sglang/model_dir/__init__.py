"""Offline Qwen2.5-VL model directories (config, processor, tokenizer, chat template) for
`--load-format dummy`: the real architecture and tokenizer, random weights."""

from vlcache_sglang.model_dir.writer import MODEL_SIZES, write_model_dir

__all__ = ["MODEL_SIZES", "write_model_dir"]
