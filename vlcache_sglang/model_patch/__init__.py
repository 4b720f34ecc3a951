"""Qwen2.5-VL model-side pieces: rotary parameters now, the selective-prefill forward next."""
