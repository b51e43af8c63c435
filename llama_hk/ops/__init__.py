"""Ops: the matmul seam (`ops.dense`) and the attention implementations (`ops.attention`), where the model's
computations are chosen per weight layout and per backend."""

from llama_hk.ops.dense import WeightLayout, to_layout

__all__ = ["WeightLayout", "to_layout"]
