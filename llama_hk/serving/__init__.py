"""Serving: an OpenAI-compatible HTTP server over a continuous-batching engine."""

from llama_hk.serving.server import serve

__all__ = ["serve"]
