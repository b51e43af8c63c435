"""Ops: the matmul seam (`ops.dense`, with LoRA's term from `ops.lora`) and the attention implementations
(`ops.attention`), where the model's computations are chosen per weight layout and per backend."""

from llama_hk.ops.dense import WeightLayout, to_layout
from llama_hk.ops.lora import LoraConfig

__all__ = ["LoraConfig", "WeightLayout", "to_layout"]
