"""`vlcache-make-model-dir DIR [--size 7B|3B]` (or `python -m vlcache_sglang.model_dir DIR`)."""

from __future__ import annotations

import argparse

from vlcache_sglang.model_dir.writer import MODEL_SIZES, write_model_dir


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write an offline Qwen2.5-VL directory for --load-format dummy.")
    p.add_argument("out_dir", help="Target directory; name it Qwen2.5-VL-7B-Instruct so SGLang picks its templates.")
    p.add_argument("--size", choices=list(MODEL_SIZES), default="7B")
    args = p.parse_args(argv)
    print(write_model_dir(args.out_dir, args.size))


if __name__ == "__main__":
    main()
