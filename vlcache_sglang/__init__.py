"""vlcache-sglang: reuse a recurring image's encoder output and KV at any position in SGLang."""

__version__ = "0.1.0"
