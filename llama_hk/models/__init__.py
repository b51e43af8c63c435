"""The LLaMA model family: the reference decoder (llama), RoPE (rope) and the KV cache (kv_cache)."""

from llama_hk.models.kv_cache import KVCache, LayerCache, init_cache, pad_cache
from llama_hk.models.llama import make_forward, transform_model

__all__ = ["KVCache", "LayerCache", "init_cache", "make_forward", "pad_cache", "transform_model"]
