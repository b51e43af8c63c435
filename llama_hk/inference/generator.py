"""The Generator: completions of token-id prompts, batch by batch, streamed as they come, with their statistics.

It places the parameters once (on the device, or sharded by `sharding.param_specs` over a mesh), asks
`platform.decode_plan` how each batch size decodes (the weight layout, the steps per call) and keeps a copy of
the parameters in each layout a plan names, made when it is first used. Each group of prompts then goes through
`decode`: padded, prefilled, decoded chunk by chunk, while each row's tokens are detokenized and checked against
the stop ids and strings.
"""

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np

from llama_hk import memory
from llama_hk import platform
from llama_hk import sharding
from llama_hk.config import LlamaConfig
from llama_hk.errors import UserError
from llama_hk.inference import decode
from llama_hk.inference.detokenize import IncrementalDetokenizer
from llama_hk.inference.sampling import Sampling
from llama_hk.ops.dense import to_layout
from llama_hk.tokenizers.tokenizer import Tokenizer


@dataclasses.dataclass
class Completion:
  ids: list[int]  # Generated ids, ending with the stop id when a stop id ended the row.
  text: str | None  # The decoded ids without a final stop id, cut before a stop string; None without tokenizer.
  finish_reason: str  # "stop" (a stop id or string) or "length" (max_new_tokens).


@dataclasses.dataclass
class GenerationStats:
  prompt_tokens: int = 0
  generated_tokens: int = 0
  time_to_first_token_s: float = 0.0  # From the call to the first tokens on the host (compile included).
  decode_tokens: int = 0  # Tokens from decode steps (all but each row's first, which the prefill samples)...
  decode_s: float = 0.0  # ... and the time from the first tokens to the last (with the decode compile, if any).
  steady_tokens: int = 0  # Tokens after each batch's first decode call...
  steady_s: float = 0.0  # ... and the time they took: decode speed without the compile.
  batches: int = 0

  @property
  def decode_tokens_per_s(self) -> float:
    """Decode throughput summed over rows: in steady state (after each batch's first decode call) if there was
    one, else over all decode steps."""
    if self.steady_s > 0:
      return self.steady_tokens / self.steady_s
    return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

  def merge(self, other: "GenerationStats") -> None:
    """Adds another call's figures (the time to first token stays the first call's)."""
    if self.batches == 0:
      self.time_to_first_token_s = other.time_to_first_token_s
    for name in ("prompt_tokens", "generated_tokens", "decode_tokens", "decode_s", "steady_tokens", "steady_s",
                 "batches"):
      setattr(self, name, getattr(self, name) + getattr(other, name))

  def as_dict(self) -> dict:
    return {"prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
            "time_to_first_token_s": round(self.time_to_first_token_s, 4), "decode_s": round(self.decode_s, 4),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2), "batches": self.batches}

  def summary(self) -> str:
    """One line for people (bin/generate prints it on stderr)."""
    return (f"prompt tokens: {self.prompt_tokens}, generated tokens: {self.generated_tokens}, "
            f"time to first token: {self.time_to_first_token_s:.3f} s, "
            f"decode: {self.decode_tokens_per_s:.1f} tokens/s")


TokenCallback = Callable[[int, list[int], str | None], None]


class Row:
  """One row's completion as its tokens arrive: the ids, the text (with a tokenizer) and whether it has ended."""

  def __init__(self, max_new_tokens: int, stop_ids: Sequence[int], text: IncrementalDetokenizer | None):
    self.max_new_tokens = max_new_tokens
    self.stop_ids = frozenset(stop_ids)
    self.text = text
    self.ids: list[int] = []
    self.finished = False

  def push(self, tokens: np.ndarray) -> list[int]:
    """Takes the row's new tokens (decode.NO_TOKEN meaning none); returns those that belong to the completion,
    up to the one that ends it (a stop id, a stop string, max_new_tokens)."""
    fresh = []
    for token in map(int, tokens):
      if self.finished or token < 0:
        break
      fresh.append(token)
      if token in self.stop_ids:
        self.finished = True
      elif self.text is not None:
        self.text.push(token)
        self.finished = self.text.stopped
      if len(self.ids) + len(fresh) == self.max_new_tokens:
        self.finished = True
    self.ids += fresh
    if self.finished and fresh and self.text is not None:
      self.text.finish()
    return fresh

  def printable(self) -> str | None:
    """The text now safe to print (None without a tokenizer)."""
    return self.text.printable(final=self.finished) if self.text is not None else None

  def completion(self) -> Completion:
    stopped = bool(self.ids) and (self.ids[-1] in self.stop_ids or (self.text is not None and self.text.stopped))
    return Completion(self.ids, self.text.text if self.text is not None else None, "stop" if stopped else "length")


class Generator:
  """Generates from one model: params placed on the device (or mesh) once, compiled functions reused across calls."""

  def __init__(self, config: LlamaConfig, params, tokenizer: Tokenizer | None = None, *, max_batch: int = 8,
               chunk_steps: int | None = None, mesh=None):
    """max_batch: prompts decoded together (more are processed in groups); chunk_steps: decode steps per call
    (default: `platform.decode_plan`'s); mesh: shard over this `sharding.make_mesh` mesh (params already laid out
    on it stay where they are).

    A plan's weight layout other than the stored one (decoding on CPU) costs the weights' bytes again: the copy is
    made once, when a batch of that plan first decodes.
    """
    if max_batch < 1:
      raise UserError(f"max_batch={max_batch}: must be at least 1")
    if chunk_steps is not None and chunk_steps < 1:
      raise UserError(f"chunk_steps={chunk_steps}: must be at least 1")
    self.config = config
    self.mesh = mesh
    self.tokenizer = tokenizer
    self.max_batch = max_batch
    self.params = platform.inference_params(
        config, jax.device_put(params, None if mesh is None else sharding.param_shardings(config, mesh)))
    batches = [1 << i for i in range(decode.batch_bucket(max_batch).bit_length())]  # Every padded batch size.
    self._plans = {batch: platform.decode_plan(config, batch, mesh) for batch in batches}
    if chunk_steps is not None:
      self._plans = {batch: dataclasses.replace(plan, chunk_steps=chunk_steps) for batch, plan in self._plans.items()}
    self._decode_params = {}  # WeightLayout -> the params in it, made on first use.

  def decode_plan(self, batch: int) -> tuple[platform.DecodePlan, dict]:
    """How a padded batch of `batch` rows decodes, and the parameters in that plan's weight layout."""
    plan = self._plans[batch]
    if plan.layout not in self._decode_params:
      self._decode_params[plan.layout] = to_layout(self.params, plan.layout)
    return plan, self._decode_params[plan.layout]

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
               seed: int = 0, stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = (),
               use_eos: bool = True,
               on_tokens: TokenCallback | None = None) -> tuple[list[Completion], GenerationStats]:
    """Completions of token-id prompts, in order.

    A row stops at any of the tokenizer's eos_ids (unless use_eos is False), at `stop_ids`, at `stop_strings`
    (needs the tokenizer) or after max_new_tokens. on_tokens(row, new_ids, new_text) streams each row's tokens
    as they come; new_text is the text now printable (None without a tokenizer).
    """
    stops = self._stop_ids(stop_ids, use_eos)
    self._validate(prompts, max_new_tokens, sampling, stops, stop_strings)
    results: list[Completion] = []
    stats = GenerationStats()
    for start in range(0, len(prompts), self.max_batch):
      group = prompts[start:start + self.max_batch]
      completions, group_stats = self._generate_batch(group, start, max_new_tokens, sampling, seed + start, stops,
                                                      stop_strings, on_tokens)
      results += completions
      stats.merge(group_stats)
    return results, stats

  def _stop_ids(self, stop_ids: Sequence[int], use_eos: bool) -> tuple[int, ...]:
    eos = self.tokenizer.eos_ids if (use_eos and self.tokenizer is not None) else ()
    return tuple(dict.fromkeys(int(i) for i in (*eos, *stop_ids)))

  def _validate(self, prompts, max_new_tokens, sampling, stops, stop_strings) -> None:
    c = self.config
    if not isinstance(sampling, Sampling):
      raise TypeError(f"sampling must be a Sampling, got {type(sampling).__name__}")
    if max_new_tokens < 1:
      raise UserError(f"max_new_tokens={max_new_tokens}: must be at least 1")
    if not prompts:
      raise UserError("no prompts given")
    for i, prompt in enumerate(prompts):
      if len(prompt) == 0:
        raise UserError(f"prompt {i} is empty")
      if len(prompt) + max_new_tokens > c.max_seq_len:
        raise UserError(f"prompt {i} has {len(prompt)} tokens: with max_new_tokens={max_new_tokens} that exceeds "
                        f"the model's max_seq_len={c.max_seq_len}")
      if min(prompt) < 0 or max(prompt) >= c.vocab_size:
        raise UserError(f"prompt {i} has token ids outside [0, {c.vocab_size})")
    if any(not 0 <= i < c.vocab_size for i in stops):
      raise UserError(f"stop ids {list(stops)} must lie in [0, {c.vocab_size})")
    if stop_strings and self.tokenizer is None:
      raise UserError("stop strings need a tokenizer, and the checkpoint has none")
    if any(not s for s in stop_strings):
      raise UserError("stop strings must not be empty")

  def _generate_batch(self, prompts, first_row, max_new_tokens, sampling, seed, stops, stop_strings,
                      on_tokens) -> tuple[list[Completion], GenerationStats]:
    """One group of prompts (rows first_row, ... of the call): streamed through on_tokens, then returned."""
    started = time.perf_counter()
    rows = [Row(max_new_tokens, stops, IncrementalDetokenizer(self.tokenizer, stop_strings) if self.tokenizer
                 else None) for _ in prompts]
    first_at = None
    steady_from = None  # (time, tokens so far) when the first decode call's tokens came back.
    for chunk in self._chunks(prompts, max_new_tokens, sampling, seed, stops):
      for r, row in enumerate(rows):
        fresh = row.push(chunk.tokens[r])
        if on_tokens is not None and fresh:
          on_tokens(first_row + r, fresh, row.printable())
      if first_at is None:
        first_at = chunk.received_at
      elif steady_from is None:
        steady_from = (chunk.received_at, sum(len(row.ids) for row in rows))
      last_at = chunk.received_at
      if all(row.finished for row in rows):
        break
    generated = sum(len(row.ids) for row in rows)
    steady_at, steady_done = steady_from or (last_at, generated)
    stats = GenerationStats(prompt_tokens=sum(len(p) for p in prompts), generated_tokens=generated,
                            time_to_first_token_s=first_at - started,
                            decode_tokens=sum(max(len(row.ids) - 1, 0) for row in rows), decode_s=last_at - first_at,
                            steady_tokens=generated - steady_done, steady_s=last_at - steady_at, batches=1)
    return [row.completion() for row in rows], stats

  def _chunks(self, prompts, max_new_tokens: int, sampling: Sampling, seed: int,
              stops: tuple[int, ...]) -> Iterator[decode.Chunk]:
    """The group's tokens as they reach the host: padded, prefilled and decoded in its batch size's plan."""
    padded = decode.PaddedBatch.build(prompts, max_new_tokens, stops)
    plan, decode_params = self.decode_plan(padded.batch)
    layout = None if self.mesh is None else sharding.DecodeLayout.for_batch(self.mesh, padded.batch)
    tokens, lengths = padded.tokens, padded.lengths
    if layout is not None:
      tokens, lengths = layout.put(tokens, "act_batch", "act_length"), layout.put(lengths, "act_batch")
    static = dict(config=self.config, sampling=sampling, layout=layout)
    state = decode.prefill(self.params, tokens, lengths, padded.stop_ids, jax.random.key(seed),
                           cache_len=padded.cache_len, **static)
    step = functools.partial(decode.decode_chunk, decode_params, stop_ids=padded.stop_ids,
                             max_steps=np.int32(max_new_tokens), chunk_steps=plan.chunk_steps,
                             weight_layout=plan.layout, **static)
    return decode.decode_chunks(state, step, max_new_tokens, plan.chunk_steps)


def memory_report(config: LlamaConfig, mesh, max_batch: int) -> dict:
  """The dry run's figures, from shapes alone: parameters per device on `mesh`, and the largest KV cache a
  Generator with `max_batch` can allocate (max_seq_len slots), per device."""
  rows, slots = decode.cache_shape(max_batch, config.max_seq_len)
  layout = sharding.DecodeLayout.for_batch(mesh, rows)
  return {**memory.param_memory_report(config, mesh), "kv_cache_rows": rows, "kv_cache_slots": slots,
          "kv_cache_batch_axes": list(layout.batch_axes),
          "kv_cache_bytes_per_device": layout.cache_bytes_per_device(config, rows, slots)}
