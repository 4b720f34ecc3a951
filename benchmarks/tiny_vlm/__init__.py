"""A small Qwen2.5-VL trained on a synthetic grid task whose answers depend on the image and on the
question before it, so that reusing an image's KV computed after other text can cost accuracy.

train.py (checkpoint SGLang serves), make_eval.py (accuracy.py data set), reuse_sim.py (the same
question answered in plain torch, with and without spliced image KV)."""
