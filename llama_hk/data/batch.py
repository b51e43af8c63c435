"""The training batch: its keys and dtypes, defined once for the pipeline, the train step and evaluation.

A batch is a dict of (B, T) arrays: `tokens`, `positions`, `segment_ids` (1, 2, ... per packed segment, 0 =
padding) and `targets` (int32), and `loss_mask` (float32, 1.0 where `targets` is a next token to score).
"""

import numpy as np

BATCH_KEYS = ("tokens", "positions", "segment_ids", "targets", "loss_mask")


def dtype(key: str) -> np.dtype:
  """The dtype of a batch array: float32 for `loss_mask`, int32 for the rest."""
  return np.dtype(np.float32 if key == "loss_mask" else np.int32)


def empty_batch(rows: int, seq_len: int) -> dict[str, np.ndarray]:
  """`rows` rows of padding: nothing attended to as a document, nothing scored (loss_mask 0)."""
  return {key: np.zeros((rows, seq_len), dtype(key)) for key in BATCH_KEYS}
