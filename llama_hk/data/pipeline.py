"""The input pipeline: documents of a TFDS split to packed, batched, checkpointable training rows, with grain.

Why grain: it reads the TFDS ArrayRecord data sources by index, so a process reads only its shard and a shuffle is
a permutation of indices (no shuffle buffer), and every stage here (shuffle, map, flat map, packing, batching,
prefetch) has a small explicit iterator state: `get_state()` after k batches and `set_state()` on a fresh iterator
continues with bit-identical batches, across epoch boundaries too.

Stages, per shard (a process reads its own shards only: one, unless `num_shards` says more):
  1. Shard: documents `shard::num_shards` of the split; shards are disjoint and cover the split (their sizes differ
     by at most one document, so shards reach epoch ends at slightly different steps).
  2. Shuffle the shard's documents with `seed`, anew each epoch (grain reseeds per epoch), repeat `num_epochs`.
  3. Tokenize: `tokenizer.encode(text, add_eos=True)`, so BOS is there when the tokenizer adds it by default and EOS
     ends every document. With `document_format="chat"` a document is a JSONL conversation (data.chat), encoded by
     the tokenizer's chat template, and its tokens carry `weights`: 1.0 on the assistant's tokens.
  4. Split documents longer than `seq_len` into chunks of `seq_len` tokens. Consecutive chunks share one token (the
     last of one is the first of the next) so that every next-token pair of the document is a target in exactly one
     chunk; each chunk is a segment with positions from 0.
  5. Pack chunks first-fit into rows of `seq_len` (`num_packing_bins` rows at a time, emitted in seeded random order).
  6. Targets: `targets[t] = tokens[t + 1]` where t + 1 is in the same segment, else 0; `loss_mask` is 1.0 exactly
     there (for chat, and only where token t + 1 is the assistant's). The model must mask attention by
     `segment_ids` so no document sees another.
  7. Batch `batch_size // num_shards` rows; a process's batch is its shards' batches side by side, in shard order;
     prefetch batches in a background thread.

The global batch is thus shards 0, 1, ... side by side whichever process reads each: with `num_shards` fixed
(it defaults to the process count), one process and several give the same batches and so the same losses.

Batches are dicts of NumPy arrays of shape (B, T) with the keys and dtypes of `llama_hk.data.batch`.

What is not trained on: the last token of each segment has no target (for a document's last chunk that is EOS;
for an earlier chunk the same pair is the first target of the next chunk, so nothing is lost there); padding;
with a finite `num_epochs`, the rows of the trailing partial batch. Empty documents still give BOS EOS.
Packing keeps up to `num_packing_bins` rows open, so documents of neighbouring epochs can share a row.

`eval_batches` is the evaluation pass over a split: every document once, in order within its shard, packed the same
way without shuffling, the last batch padded with empty rows (loss_mask 0), so summing loss over batches covers the
split.
"""

import itertools
from typing import Iterator

import grain
import jax
import numpy as np

from llama_hk.data import chat
from llama_hk.data.batch import BATCH_KEYS, empty_batch
from llama_hk.data.sources import TextSource
from llama_hk.errors import UserError
from llama_hk.tokenizers.tokenizer import Tokenizer


DOCUMENT_FORMATS = ("text", "chat")


def tokenize_document(text: str, tokenizer: Tokenizer) -> np.ndarray:
  """BOS as the tokenizer adds it by default, the text, and EOS."""
  return np.asarray(tokenizer.encode(text, add_eos=True), np.int32)


def _tokenize(document_format: str, tokenizer: Tokenizer):
  """Document -> {"tokens"} (text) or {"tokens", "weights"} (a chat JSONL line, weights 1.0 on the assistant's)."""
  if document_format not in DOCUMENT_FORMATS:
    raise UserError(f"document_format={document_format!r}: must be one of {DOCUMENT_FORMATS}")
  if document_format == "text":
    return lambda text: {"tokens": tokenize_document(text, tokenizer)}

  def conversation(line: str) -> dict[str, np.ndarray]:
    tokens, weights = chat.encode(chat.parse_line(line, "chat document"), tokenizer)
    return {"tokens": tokens, "weights": weights}
  return conversation


def split_document(tokens: np.ndarray, seq_len: int) -> list[np.ndarray]:
  """Chunks of at most seq_len tokens overlapping by one, so every (token, next token) pair is inside one chunk."""
  if len(tokens) <= seq_len:
    return [tokens]
  stride = seq_len - 1
  return [tokens[start:start + seq_len] for start in range(0, len(tokens) - 1, stride)]


def add_targets(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A packed row (grain's `tokens`, `tokens_segment_ids`, `tokens_positions`) with its next-token targets."""
  tokens = packed["tokens"]
  segment_ids = packed["tokens_segment_ids"]
  next_in_segment = (segment_ids[1:] == segment_ids[:-1]) & (segment_ids[1:] != 0)
  targets = np.zeros_like(tokens)
  targets[:-1] = np.where(next_in_segment, tokens[1:], 0)
  loss_mask = np.zeros(tokens.shape, np.float32)
  loss_mask[:-1] = next_in_segment
  if "weights" in packed:  # Chat: only the assistant's tokens are targets.
    loss_mask[:-1] *= packed["weights"][1:]
  return {"tokens": tokens, "positions": packed["tokens_positions"], "segment_ids": segment_ids,
          "targets": targets, "loss_mask": loss_mask}


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise UserError(f"process_index={process_index} is not in [0, process_count={process_count})")
  return process_index, process_count


def _packed_rows(documents: grain.MapDataset, tokenizer: Tokenizer, seq_len: int, num_packing_bins: int,
                 seed: int, shuffle_rows: bool, read_threads: int, document_format: str) -> grain.IterDataset:
  """Tokenized, chunked and packed rows with targets: stages 3 to 6."""
  if seq_len < 2:
    raise UserError(f"seq_len={seq_len} must be at least 2 (a token and its target)")
  if tokenizer.eos_id is None:
    raise UserError(f"{tokenizer.source}: the tokenizer has no EOS token to end documents with")
  tokenize = _tokenize(document_format, tokenizer)
  tokens = documents.map(tokenize)
  # Reading threads fetch records and tokenize ahead of the consumer, in a deterministic order. Tokenization holds
  # the GIL, so one thread is usually best; more help only when reading, not tokenizing, is the bottleneck.
  rows = tokens.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * read_threads))
  chunks = grain.experimental.FlatMapIterDataset(rows, _SplitDocument(seq_len))
  keys = ("tokens",) if document_format == "text" else ("tokens", "weights")
  packed = grain.experimental.FirstFitPackIterDataset(
      chunks, length_struct={key: seq_len for key in keys}, num_packing_bins=num_packing_bins, seed=seed,
      shuffle_bins=shuffle_rows)
  return packed.map(add_targets)


class _SplitDocument(grain.experimental.FlatMapTransform):
  """split_document as a grain flat map. On an IterDataset the number of chunks a document gives is unbounded."""

  def __init__(self, seq_len: int):
    self._seq_len = seq_len

  def flat_map(self, document: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    chunks = {key: split_document(value, self._seq_len) for key, value in document.items()}
    return [{key: chunks[key][k] for key in chunks} for k in range(len(chunks["tokens"]))]


def _local_shards(batch_size: int, num_shards: int | None, process_index: int | None,
                  process_count: int | None) -> tuple[int, int, range]:
  """(num_shards, rows a shard gives each batch, this process's shards)."""
  process_index, process_count = _process(process_index, process_count)
  if batch_size <= 0 or batch_size % process_count:
    raise UserError(f"batch_size={batch_size} must be a positive multiple of process_count={process_count}")
  num_shards = process_count if num_shards is None else num_shards
  if num_shards <= 0 or num_shards % process_count or batch_size % num_shards:
    raise UserError(f"num_shards={num_shards} must be a positive multiple of process_count={process_count} that "
                    f"divides batch_size={batch_size}")
  per_process = num_shards // process_count
  return num_shards, batch_size // num_shards, range(process_index * per_process, (process_index + 1) * per_process)


def make_pipeline(source: TextSource, tokenizer: Tokenizer, seq_len: int, batch_size: int, seed: int = 0,
                  process_index: int | None = None, process_count: int | None = None, num_epochs: int | None = None,
                  num_packing_bins: int = 16, read_threads: int = 1, prefetch_batches: int = 2,
                  num_shards: int | None = None, document_format: str = "text") -> grain.DatasetIterator:
  """The training iterator of one process: batches of `batch_size // process_count` packed rows.

  process_index, process_count: this process's part (default jax.process_index(), jax.process_count()).
  num_shards: document shards the global batch is drawn from, a multiple of process_count (the default) dividing
    batch_size; fixing it keeps the batches the same on any number of processes that divides it.
  num_epochs: None repeats forever. document_format: "text", or "chat" (data.chat: JSONL conversations, the loss on
  the assistant's tokens). The returned iterator has get_state() / set_state() for checkpoints; close() it
  to stop its prefetch thread.
  """
  if not 0 <= seed < 2**32:
    raise UserError(f"seed={seed} must be in [0, 2**32)")
  num_shards, rows_per_shard, shards = _local_shards(batch_size, num_shards, process_index, process_count)
  shard_batches = []
  for shard in shards:
    documents = grain.MapDataset.source(source)[shard::num_shards]
    if not len(documents):
      raise UserError(f"{source.description}: shard {shard} of {num_shards} has no documents")
    rows = _packed_rows(documents.shuffle(seed=seed).repeat(num_epochs), tokenizer, seq_len, num_packing_bins, seed,
                        shuffle_rows=True, read_threads=read_threads, document_format=document_format)
    shard_batches.append(rows.batch(rows_per_shard, drop_remainder=True))
  # Not strict: with a finite num_epochs the pass ends with this process's shortest shard.
  batches = grain.experimental.ZipIterDataset(shard_batches, strict=False).map(_side_by_side)
  return iter(grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=prefetch_batches))


def _side_by_side(batches: tuple[dict[str, np.ndarray], ...]) -> dict[str, np.ndarray]:
  return {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}


def eval_batches(source: TextSource, tokenizer: Tokenizer, seq_len: int, batch_size: int,
                 process_index: int | None = None, process_count: int | None = None,
                 num_packing_bins: int = 16, num_shards: int | None = None,
                 document_format: str = "text") -> Iterator[dict[str, np.ndarray]]:
  """One in-order pass over this process's shards of a split (`num_shards` as in make_pipeline), packed.

  Batch i is each shard's batch i side by side, a shard's last batch padded with empty rows and a shard that has
  ended giving only empty rows, until every shard of the process has ended. So the first k global batches are the
  same on any process count, and processes can get different numbers of batches.
  """
  num_shards, rows_per_shard, shards = _local_shards(batch_size, num_shards, process_index, process_count)
  empty = empty_batch(rows_per_shard, seq_len)
  passes = [_eval_shard(grain.MapDataset.source(source)[shard::num_shards], tokenizer, seq_len, rows_per_shard,
                        num_packing_bins, document_format) for shard in shards]
  for batches in itertools.zip_longest(*passes, fillvalue=empty):
    yield _side_by_side(batches)


def _eval_shard(documents: grain.MapDataset, tokenizer: Tokenizer, seq_len: int, rows: int,
                num_packing_bins: int, document_format: str) -> Iterator[dict[str, np.ndarray]]:
  if not len(documents):
    return
  packed = _packed_rows(documents, tokenizer, seq_len, num_packing_bins, seed=0, shuffle_rows=False, read_threads=1,
                        document_format=document_format)
  for batch in packed.batch(rows, drop_remainder=False):
    missing = rows - len(batch["tokens"])
    if missing:
      padding = empty_batch(missing, seq_len)
      batch = {key: np.concatenate([batch[key], padding[key]]) for key in BATCH_KEYS}
    yield batch
