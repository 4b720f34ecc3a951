"""vlcache-sglang: position-independent image KV reuse for SGLang 0.5.16 (Qwen2.5-VL)."""
from setuptools import find_packages, setup

setup(
    name="vlcache-sglang",
    version="0.1.0",
    description="Reuse a recurring image's encoder output and KV at any position in SGLang (VLCache).",
    packages=find_packages(include=["vlcache_sglang", "vlcache_sglang.*"]),
    package_data={"vlcache_sglang": ["model_dir/templates/*.jinja"]},
    python_requires=">=3.10",
    install_requires=[
        # sglang 0.5.16 pins torch 2.11.0, flashinfer-python 0.6.14 and transformers 5.12.1.
        "sglang==0.5.16",
        "xxhash>=3.4",
        "triton",
        # Ships qwen.tiktoken, the Qwen2 BPE ranks the offline model directory is built from.
        "dashscope==2.0.2",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100", "pillow"],
        # Plots of benchmarks/ (the tables and raw JSON need nothing beyond the install above).
        "bench": ["matplotlib>=3.8"],
    },
    entry_points={
        "sglang.srt.plugins": ["vlcache = vlcache_sglang.plugin:register"],
        "console_scripts": ["vlcache-make-model-dir = vlcache_sglang.model_dir.cli:main"],
    },
)
