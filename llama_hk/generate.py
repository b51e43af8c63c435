"""Text generation: a prefill pass, then decode steps against a preallocated KV cache, and sampling.

Static shapes, one compile per bucket: the batch is padded to a power of two, the prompt to a power of two (then
a multiple of 512), and the cache to the bucket of prompt + max_new_tokens, not to the model's max_seq_len,
since every decode step reads the whole cache. JAX's persistent compilation cache (turned on by the binaries)
keeps those compiles across runs.

Prompts of different lengths are right-padded with segment id 0 in the prefill, so each row's cache stays
contiguous, its positions count from 0 and its decode steps write at the row's own end. The prefill runs on a
cache of just the prompt's length, padded to the full length afterwards, and computes the head's logits at each
row's last prompt token only.

The decode loop is a jitted function that runs up to `chunk_steps` steps in a `lax.while_loop` and donates its
state (the cache above all). The host dispatches the next call before it reads the last call's tokens, so the
device does not wait while the host streams tokens, detokenizes and checks stop strings.

With a mesh, parameters are sharded by `sharding.param_specs`, the rows over the data-parallel axes that divide
the batch (`sharding.DecodeLayout`) and the cache's heads over `tensor`; sampled tokens come back replicated, so
that every process of a multi-host run reads the same ones and takes the same steps.

Shape glossary: B batch, T prompt time, S cache length, V vocab, C candidate tokens (V, or top_k).
"""

import contextlib
import dataclasses
import functools
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from llama_hk import model
from llama_hk import sharding
from llama_hk.config import LlamaConfig
from llama_hk.errors import UserError
from llama_hk.tokenizer import Tokenizer

_MIN_BUCKET = 16
_LINEAR_BUCKETS_FROM = 512  # Beyond this, buckets grow in steps of 512 rather than doubling.


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How each next token is drawn.

  temperature 0 is greedy (argmax). Otherwise, as transformers orders it: logits / temperature, keep the top_k
  most likely (0: all), then keep the most likely tokens whose probabilities sum to at least top_p (1: all),
  renormalize and draw. Hashable: it is a static argument of the compiled functions. (Top-p keeps every token
  tied with the last one kept, where a sort would keep some of them in an arbitrary order.)
  """
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0:  # Also catches NaN.
      raise UserError(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")
    if not 0 < self.top_p <= 1:
      raise UserError(f"top_p={self.top_p}: must be in (0, 1]")
    if self.top_k < 0:
      raise UserError(f"top_k={self.top_k}: must be >= 0 (0 keeps every token)")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def argmax(logits: jax.Array) -> jax.Array:
  """First index of the maximum, (B, V) -> (B,) int32; two plain reductions, several times faster on XLA:CPU than
  jnp.argmax's variadic (value, index) reduction."""
  best = jnp.max(logits, axis=-1, keepdims=True)  # (B, 1)
  index = jnp.arange(logits.shape[-1], dtype=jnp.int32)  # (V,)
  return jnp.min(jnp.where(logits == best, index, logits.shape[-1]), axis=-1)  # (B,)


def top_p_threshold(probs: jax.Array, top_p: float) -> jax.Array:
  """The smallest probability kept by nucleus filtering, (B, C) -> (B, 1).

  That is p_m, where p_1 >= p_2 >= ... sorted and m is the first index whose cumulative sum reaches top_p. A
  bisection over the bit patterns of non-negative float32 (ordered like the floats) finds it exactly in 31
  masked sums, instead of a sort of the vocabulary, which XLA:CPU does about a hundred times slower.
  """
  bits = jax.lax.bitcast_convert_type(probs, jnp.int32)  # (B, C), non-negative floats order as their bits
  low = jnp.zeros(probs.shape[:-1] + (1,), jnp.int32)  # (B, 1): mass(p >= low) >= top_p always holds.
  high = jnp.max(bits, axis=-1, keepdims=True) + 1  # (B, 1): mass(p >= high) = 0 < top_p.

  def halve(_, bounds):
    low, high = bounds
    mid = low + (high - low) // 2  # (B, 1)
    enough = jnp.sum(jnp.where(bits >= mid, probs, 0), axis=-1, keepdims=True) >= top_p  # (B, 1)
    return jnp.where(enough, mid, low), jnp.where(enough, high, mid)

  low, _ = jax.lax.fori_loop(0, 31, halve, (low, high))
  return jax.lax.bitcast_convert_type(low, jnp.float32)  # (B, 1)


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """Next tokens (B,) int32 from float32 logits (B, V)."""
  if sampling.greedy:
    return argmax(logits)
  logits = logits / sampling.temperature  # (B, V)
  candidates = None
  if 0 < sampling.top_k < logits.shape[-1]:
    logits, candidates = jax.lax.top_k(logits, sampling.top_k)  # (B, C), (B, C)
  probs = jax.nn.softmax(logits, axis=-1)  # (B, C)
  if sampling.top_p < 1:
    probs = jnp.where(probs >= top_p_threshold(probs, sampling.top_p), probs, 0)  # (B, C)
  # Inverse CDF with one uniform per row (Gumbel-max would draw B * V of them, slow on CPU for a large vocab).
  cdf = jnp.cumsum(probs, axis=-1)  # (B, C)
  u = jax.random.uniform(key, cdf.shape[:-1] + (1,)) * cdf[:, -1:]  # (B, 1)
  index = jnp.arange(probs.shape[-1], dtype=jnp.int32)  # (C,)
  last_kept = jnp.max(jnp.where(probs > 0, index, 0), axis=-1)  # (B,): where rounding at u ~ 1 must stop.
  choice = jnp.minimum(jnp.sum(cdf <= u, axis=-1, dtype=jnp.int32), last_kept)  # (B,)
  if candidates is None:
    return choice
  return jnp.take_along_axis(candidates, choice[:, None], axis=-1)[:, 0]  # (B,)


class _State(NamedTuple):
  """What the decode loop carries from one jitted call to the next (donated to each)."""
  cache: model.KVCache
  tokens: jax.Array  # (B,) int32: each row's last sampled token, the next step's input.
  done: jax.Array  # (B,) bool: the row sampled a stop id (or is batch padding).
  step: jax.Array  # () int32: tokens sampled so far in every row.
  key: jax.Array  # Sampling key; the k-th token of every row is drawn with fold_in(key, k).


def prefill_logits(params, tokens, lengths, config: LlamaConfig, cache_len: int,
                   layout: sharding.DecodeLayout | None = None):
  """Runs the prompts (B, T), right-padded, into a fresh cache, returned with cache_len slots.

  Returns each row's logits (B, V) at its last prompt token (lengths - 1) and the cache, whose end_index is then
  each row's length: padding takes segment id 0, so it neither moves the end nor is attended to. The pass runs
  on a cache of T slots, grown afterwards: attention over all cache_len slots would cost cache_len / T times more.
  """
  b, t = tokens.shape
  segment_ids = (jnp.arange(t)[None, :] < lengths[:, None]).astype(jnp.int32)  # (B, T)
  last = jnp.maximum(lengths - 1, 0)  # (B,)
  with _axis_rules(layout):
    logits, cache = model.make_forward(config).apply(params, tokens, segment_ids=segment_ids,
                                                     cache=model.init_cache(config, b, t), logits_at=last)  # (B, 1, V)
  return logits[:, 0], model.pad_cache(cache, cache_len)


def step_logits(params, tokens, cache: model.KVCache, config: LlamaConfig,
                layout: sharding.DecodeLayout | None = None):
  """One decode step: each row's token (B,) at the row's cache end. Returns logits (B, V) and the cache."""
  with _axis_rules(layout):
    logits, cache = model.make_forward(config).apply(params, tokens[:, None], cache=cache)  # (B, 1, V)
  return logits[:, 0], cache


def _axis_rules(layout: sharding.DecodeLayout | None):
  """The model's activation constraints for `layout` (none without one)."""
  return sharding.axis_rules(layout.mesh, layout.rules()) if layout else contextlib.nullcontext()


def _pin(tree, layout: sharding.DecodeLayout | None):
  """Outputs laid out as `layout` says: one layout in and out of every call, so that a donated state is reused in
  place and nothing compiles twice, and sampled tokens replicated, readable by every process."""
  if layout is None:
    return tree
  cache, replicated = layout.cache_sharding(), layout.sharding()

  def place(x):
    if isinstance(x, model.KVCache):
      return model.KVCache(jax.lax.with_sharding_constraint(x.k, cache), jax.lax.with_sharding_constraint(x.v, cache),
                           jax.lax.with_sharding_constraint(x.end_index, replicated))
    return jax.lax.with_sharding_constraint(x, replicated)

  return jax.tree.map(place, tree, is_leaf=lambda x: isinstance(x, model.KVCache))


@functools.partial(jax.jit, static_argnames=("config", "sampling", "cache_len", "layout"))
def _prefill(params, tokens, lengths, stop_ids, key, *, config: LlamaConfig, sampling: Sampling, cache_len: int,
             layout: sharding.DecodeLayout | None = None):
  """The prompts into a fresh cache; samples each row's first token."""
  logits, cache = prefill_logits(params, tokens, lengths, config, cache_len, layout)  # (B, V)
  first = sample(logits, jax.random.fold_in(key, 0), sampling)  # (B,)
  done = jnp.isin(first, stop_ids) | (lengths == 0)  # (B,)
  return _pin(_State(cache, first, done, jnp.int32(1), key), layout)


@functools.partial(jax.jit, static_argnames=("config", "sampling", "chunk_steps", "layout"),
                   donate_argnames=("state",))
def _decode(params, state: _State, stop_ids, max_steps, *, config: LlamaConfig, sampling: Sampling,
            chunk_steps: int, layout: sharding.DecodeLayout | None = None):
  """Up to chunk_steps decode steps, fewer once every row is done or max_steps tokens are out.

  Returns the new state, the tokens (B, chunk_steps) (-1 for rows already done) and how many steps ran.
  """
  def should_continue(carry):
    i, s, _ = carry
    return (i < chunk_steps) & (s.step < max_steps) & ~jnp.all(s.done)

  def step(carry):
    i, s, out = carry
    logits, cache = step_logits(params, s.tokens, s.cache, config, layout)  # (B, V)
    tokens = sample(logits, jax.random.fold_in(s.key, s.step), sampling)  # (B,)
    out = out.at[:, i].set(jnp.where(s.done, -1, tokens))  # (B, chunk_steps)
    return i + 1, _State(cache, tokens, s.done | jnp.isin(tokens, stop_ids), s.step + 1, s.key), out

  out = jnp.full((state.tokens.shape[0], chunk_steps), -1, jnp.int32)  # (B, chunk_steps)
  steps, state, out = jax.lax.while_loop(should_continue, step, (jnp.int32(0), state, out))
  return _pin((state, out, steps), layout)


def bucket(n: int) -> int:
  """The padded length for n: a power of two from 16 up to 512, then a multiple of 512."""
  if n <= _LINEAR_BUCKETS_FROM:
    return max(_MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length())
  return -(-n // _LINEAR_BUCKETS_FROM) * _LINEAR_BUCKETS_FROM


def _power_of_two(n: int) -> int:
  return 1 << (max(n, 1) - 1).bit_length()


class _RowText:
  """One row's text, decoded incrementally, with stop strings applied and the printable part tracked.

  Decoding from a recent offset (as transformers' and vLLM's streamers do) keeps the work linear, keeps
  SentencePiece's word-initial spaces, and holds back a byte sequence that is not yet a whole character.
  """

  def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str]):
    self.tokenizer = tokenizer
    self.stop_strings = tuple(stop_strings)
    self.ids: list[int] = []
    self.text = ""
    self.prefix_offset = 0
    self.read_offset = 0
    self.emitted = 0
    self.stopped = False

  def push(self, token: int) -> None:
    """Adds one token; sets `stopped` when the text now contains a stop string (cut off there)."""
    self.ids.append(token)
    prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
    full = self.tokenizer.decode(self.ids[self.prefix_offset:])
    if len(full) <= len(prefix) or full.endswith("\ufffd"):
      return
    searched_from = len(self.text)
    self.text += full[len(prefix):]
    self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
    for stop in self.stop_strings:
      at = self.text.find(stop, max(0, searched_from - len(stop) + 1))
      if at >= 0:
        self.text = self.text[:at]
        self.stopped = True

  def finish(self) -> None:
    """Decodes what push held back: the row has ended, so a partial character is as whole as it gets."""
    if not self.stopped and self.read_offset < len(self.ids):
      prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
      self.text += self.tokenizer.decode(self.ids[self.prefix_offset:])[len(prefix):]
      self.read_offset = len(self.ids)

  def printable(self, final: bool) -> str:
    """Text not yet handed out, less (unless final) a tail that could still become a stop string."""
    end = len(self.text)
    if not final:
      for stop in self.stop_strings:
        for n in range(min(len(stop) - 1, len(self.text)), 0, -1):
          if self.text.endswith(stop[:n]):
            end = min(end, len(self.text) - n)
            break
    out = self.text[self.emitted:end]
    self.emitted = max(self.emitted, end)
    return out


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


TokenCallback = Callable[[int, list[int], str | None], None]


class Generator:
  """Generates from one model: params placed on the device (or mesh) once, compiled functions reused across calls."""

  def __init__(self, config: LlamaConfig, params, tokenizer: Tokenizer | None = None, *, max_batch: int = 8,
               chunk_steps: int | None = None, mesh=None):
    """max_batch: prompts decoded together (more are processed in groups); chunk_steps: decode steps per call;
    mesh: shard over this `sharding.make_mesh` mesh (params already laid out on it stay where they are).

    chunk_steps defaults to 1 (every token streams as soon as it exists, at no measurable cost), except for
    16-bit parameters on CPU: XLA:CPU computes in float32 and casts every weight at the start of each call,
    which a call of one step would pay per token, so there it defaults to 32.
    """
    if chunk_steps is None:
      narrow = config.param_dtype != "float32" or config.compute_dtype != "float32"
      chunk_steps = 32 if narrow and jax.default_backend() == "cpu" else 1
    if max_batch < 1:
      raise UserError(f"max_batch={max_batch}: must be at least 1")
    if chunk_steps < 1:
      raise UserError(f"chunk_steps={chunk_steps}: must be at least 1")
    self.config = config
    self.mesh = mesh
    self.params = jax.device_put(params, None if mesh is None else sharding.param_shardings(config, mesh))
    # A batch of one decodes on XLA:CPU from a transposed copy of the matrix weights, which it streams without
    # copying each layer's slice out of the stack (model.transpose_weights); prefills and larger batches are
    # faster in the stored layout. The copy costs the matrix weights' bytes a second time.
    self._batch1_params = (model.transpose_weights(self.params) if mesh is None and jax.default_backend() == "cpu"
                           else self.params)
    self.tokenizer = tokenizer
    self.max_batch = max_batch
    self.chunk_steps = chunk_steps

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
      results += self._generate_batch(group, start, max_new_tokens, sampling, seed + start, stops, stop_strings,
                                      on_tokens, stats)
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

  def _generate_batch(self, prompts, first_row, max_new_tokens, sampling, seed, stops, stop_strings, on_tokens,
                      stats: GenerationStats) -> list[Completion]:
    started = time.perf_counter()
    rows = len(prompts)
    longest = max(len(p) for p in prompts)
    batch, prompt_len = _power_of_two(rows), bucket(longest)
    cache_len = max(prompt_len, bucket(longest + max_new_tokens))
    tokens = np.zeros((batch, prompt_len), np.int32)  # (B, T), right-padded
    lengths = np.zeros((batch,), np.int32)  # (B,): 0 marks batch padding
    for i, prompt in enumerate(prompts):
      tokens[i, :len(prompt)] = prompt
      lengths[i] = len(prompt)
    stop_array = np.full((_power_of_two(max(len(stops), 8)),), -1, np.int32)
    stop_array[:len(stops)] = stops
    layout = None if self.mesh is None else sharding.DecodeLayout.for_batch(self.mesh, batch)
    if layout is not None:
      tokens, lengths = layout.put(tokens, "act_batch", "act_length"), layout.put(lengths, "act_batch")
    static = dict(config=self.config, sampling=sampling, layout=layout)

    state = _prefill(self.params, tokens, lengths, stop_array, jax.random.key(seed), cache_len=cache_len, **static)
    decode = functools.partial(_decode, self._batch1_params if batch == 1 else self.params, stop_ids=stop_array,
                               max_steps=np.int32(max_new_tokens), chunk_steps=self.chunk_steps, **static)
    first = np.asarray(state.tokens)  # Waits for the prefill only; read before `state` is donated.
    first_at = last_at = time.perf_counter()
    pending = decode(state) if max_new_tokens > 1 else None

    ids = [[] for _ in range(rows)]
    texts = [_RowText(self.tokenizer, stop_strings) if self.tokenizer else None for _ in range(rows)]
    finished = [False] * rows

    def take(new_tokens: np.ndarray) -> None:
      """Appends each row's new tokens (B, n), -1 meaning none; marks rows that stop."""
      for r in range(rows):
        fresh = []
        for token in new_tokens[r]:
          if finished[r] or token < 0:
            break
          fresh.append(int(token))
          if token in stops:
            finished[r] = True
          else:
            text = texts[r]
            if text is not None:
              text.push(int(token))
              finished[r] = text.stopped
          if len(ids[r]) + len(fresh) == max_new_tokens:
            finished[r] = True
        ids[r] += fresh
        if finished[r] and texts[r] is not None:
          texts[r].finish()
        if on_tokens is not None and fresh:
          on_tokens(first_row + r, fresh, texts[r].printable(final=finished[r]) if texts[r] else None)

    take(first[:, None])
    steps = 1
    steady_from = None  # (time, tokens so far) when the first decode call came back.
    while pending is not None and not all(finished):
      state, out, ran = pending
      # Dispatch the next call before reading this one, so that the device keeps working meanwhile.
      more = steps + self.chunk_steps < max_new_tokens
      pending = decode(state) if more else None
      ran = int(ran)
      if ran == 0:
        break
      take(np.asarray(out)[:, :ran])
      steps += ran
      last_at = time.perf_counter()
      if steady_from is None:
        steady_from = (last_at, sum(len(row) for row in ids))

    stats.prompt_tokens += sum(len(p) for p in prompts)
    stats.generated_tokens += sum(len(row) for row in ids)
    stats.decode_tokens += sum(max(len(row) - 1, 0) for row in ids)
    stats.decode_s += last_at - first_at
    if steady_from is not None:
      stats.steady_s += last_at - steady_from[0]
      stats.steady_tokens += sum(len(row) for row in ids) - steady_from[1]
    if stats.batches == 0:
      stats.time_to_first_token_s = first_at - started
    stats.batches += 1
    completions = []
    for r in range(rows):
      stopped = bool(ids[r]) and (ids[r][-1] in stops or (texts[r] is not None and texts[r].stopped))
      completions.append(Completion(ids[r], texts[r].text if texts[r] else None, "stop" if stopped else "length"))
    return completions


def read_prompt_file(path: str | os.PathLike) -> list[str]:
  """One prompt a line; a blank line is an error (an empty prompt), not a separator."""
  try:
    lines = pathlib.Path(path).read_text(encoding="utf-8").splitlines()
  except OSError as e:
    raise UserError(f"{path}: cannot read ({e.strerror})") from None
  except UnicodeDecodeError:
    raise UserError(f"{path}: not UTF-8 text") from None
  if not lines:
    raise UserError(f"{path}: no prompts")
  for number, line in enumerate(lines, 1):
    if not line.strip():
      raise UserError(f"{path}:{number}: empty prompt")
  return lines


def prompt_ids(tokenizer: Tokenizer, text: str, chat: bool = False) -> list[int]:
  """A text prompt's ids: encoded as is (with the tokenizer's default BOS), or as one user turn of its chat."""
  if not text:
    raise UserError("the prompt is empty")
  if chat:
    return Chat(tokenizer).prompt_ids(text)
  return tokenizer.encode(text)


class Chat:
  """A conversation through the tokenizer's chat template; each reply joins the history for the next turn."""

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer
    self.messages: list[dict] = []

  def prompt_ids(self, user_text: str) -> list[int]:
    """Adds a user turn; returns the whole conversation's ids, ready for the assistant's reply."""
    if not user_text:
      raise UserError("the prompt is empty")
    self.messages.append({"role": "user", "content": user_text})
    rendered = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True)
    return self.tokenizer.encode(rendered, add_bos=False, add_eos=False)  # The template writes its own specials.

  def add_reply(self, text: str) -> None:
    self.messages.append({"role": "assistant", "content": text})
