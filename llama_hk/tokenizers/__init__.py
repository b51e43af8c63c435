"""Tokenizers: one interface over sentencepiece and `tokenizer.json` (tokenizer), GGUF vocabularies rebuilt as
`tokenizer.json` (from_gguf), and LLaMA-style sentencepiece training (train_spm)."""

from llama_hk.tokenizers.tokenizer import Tokenizer

__all__ = ["Tokenizer"]
