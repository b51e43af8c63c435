"""The serving engine: one continuous-batching decode loop over up to max_batch rows of a shared KV cache.

One background thread owns the cache and every compiled call. The running batch is bucketed by occupancy (1, 2,
4, ... rows, at most `decode.batch_bucket(max_batch)`), so a lone stream decodes on the batch-1 path (the
platform's batch-1 weight layout included). The cache keeps the slots its rows reach within SLOTS_AHEAD more
tokens (at most their prompt + max_tokens), bucketed, and grows, at least doubling, as they get there: a decode
step attends over no more slots than its rows can fill soon, whatever the context and max_tokens (a chat request
without max_tokens may run to the end of the context). New requests of one prompt bucket are prefilled together
(up to PREFILL_ROWS, a power of two) and written into free rows, joining at the next decode call. A decode call runs
DECODE_CHUNK steps while no request waits and no row can finish inside it, else one step; a row that finishes or
is cancelled frees its row before the next call, and when no request waits and the rows in use fit a smaller
bucket they are gathered into it. Requests beyond the rows wait in a bounded queue.

Each row samples with its own fields (temperature, top-k, top-p) and key: the k-th token of a sequence is drawn
with fold_in(fold_in(key(seed), choice), k), so what a row produces does not depend on what else is in the
batch (greedy rows: up to the reduction order of a different batch size). Callers talk to the thread through
`submit` (thread-safe) and get `Output`s through their callback, called on the engine's thread.

Shape glossary: B rows, T prompt time, S cache slots, V vocab, N top log-probabilities, C steps per call.
"""

import collections
import dataclasses
import functools
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from llama_hk.errors import UserError
from llama_hk.inference import decode
from llama_hk.inference.detokenize import IncrementalDetokenizer
from llama_hk.inference.generator import Generator, Row
from llama_hk.inference.sampling import argmax, sample_rows, scaled_logits
from llama_hk.models import KVCache, init_cache, make_forward, pad_cache
from llama_hk.ops.dense import WeightLayout

PREFILL_ROWS = 4  # The most new sequences prefilled in one call (1, 2 or 4: a few compiles per prompt bucket).
# Decode steps per call while every row has that many tokens left and no request waits (decode_steps): fewer
# calls, each one's dispatch, output arrays and host delivery shared by 8 tokens of every row.
DECODE_CHUNK = 8
MAX_TOP_LOGPROBS = 20  # Alternatives computed per token when a row asks for log-probabilities (OpenAI's limit).
# Tokens beyond each row's current length that the cache's slots cover: two decode calls of the longest plan
# (platform.decode_plan's 32 steps), so that the call in flight and the next one always fit.
SLOTS_AHEAD = 64


@dataclasses.dataclass(frozen=True)
class Request:
  """One sequence to generate: a prompt's ids and how to sample its continuation."""
  prompt: tuple[int, ...]
  max_tokens: int  # 0: only the prompt's log-probabilities (with prompt_logprobs).
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  choice: int = 0  # Which of a request's samples this is: samples of one seed differ by it.
  stop: tuple[str, ...] = ()
  logprobs: bool = False  # Each generated token's log-probability and its MAX_TOP_LOGPROBS alternatives.
  prompt_logprobs: bool = False  # The same for every prompt token but the first.


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
  """A token's log-probability under the distribution after temperature, and the most likely alternatives."""
  logprob: float
  top: tuple[tuple[int, float], ...]  # (id, log-probability), most likely first.


@dataclasses.dataclass
class Output:
  """What a sequence produced since its last Output. The last one has a finish_reason ("stop", "length")."""
  ids: list[int]  # New ids, ending with the stop id when one ended the sequence.
  text: str  # New text safe to show: never a part of a stop string, never half a character.
  logprobs: list[TokenLogprob] | None = None  # One per id, with Request.logprobs.
  finish_reason: str | None = None
  prompt_logprobs: list[TokenLogprob] | None = None  # In the first Output, with Request.prompt_logprobs.
  error: str | None = None  # The engine failed on this sequence (the last Output).


class Busy(Exception):
  """The wait queue is full."""


class Job:
  """A submitted request: the handle its caller cancels, and the engine's record of it."""

  def __init__(self, request: Request, emit: Callable[[Output], None], engine: "Engine"):
    self.request = request
    self.emit = emit
    self.cancelled = False
    self._engine = engine
    self.row: Row | None = None  # Set when it is prefilled.
    self.last_token = 0

  def reach(self, ahead: int) -> int:
    """The cache slots the sequence may fill within `ahead` more tokens: its prompt, the tokens read so far and
    `ahead`, at most its prompt + max_tokens (a row past its budget is done: what it writes after that is never
    read)."""
    length = len(self.request.prompt) + (len(self.row.ids) if self.row is not None else 0)
    return min(length + ahead, len(self.request.prompt) + self.request.max_tokens)

  def cancel(self) -> None:
    """Frees the sequence's row before the next decode call (thread-safe; no further Output)."""
    self.cancelled = True
    self._engine.wake()


class RowFields(NamedTuple):
  """Each row's sampling fields, (B,) each."""
  seed: jax.Array  # int32
  choice: jax.Array  # int32
  steps: jax.Array  # int32: tokens the row has sampled so far (the key's index of the next one).
  temperature: jax.Array  # float32
  top_k: jax.Array  # int32
  top_p: jax.Array  # float32
  budget: jax.Array  # int32: tokens the row may still sample; 0 for a free row.


def _pick(logits, fields: RowFields, step, sampled: bool, top_n: int):
  """Each row's next token (B,) from logits (B, V), its log-probability (B,) and the top_n alternatives' ids and
  log-probabilities (B, N): zeros and empty without top_n. `sampled` is False when every row is greedy."""
  keys = jax.vmap(lambda s, c, k: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), c), k))(
      fields.seed, fields.choice, fields.steps + step)  # (B,)
  tokens = (sample_rows(logits, keys, fields.temperature, fields.top_k, fields.top_p) if sampled
            else argmax(logits))  # (B,)
  if not top_n:
    b = logits.shape[0]
    return tokens, jnp.zeros((b,), jnp.float32), jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, 0), jnp.float32)
  logprobs = jax.nn.log_softmax(scaled_logits(logits, fields.temperature), axis=-1)  # (B, V)
  chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]  # (B,)
  top_values, top_ids = jax.lax.top_k(logprobs, top_n)  # (B, N) x 2
  return tokens, chosen, top_ids, top_values


@functools.partial(jax.jit, static_argnames=("config", "sampled", "top_n"))
def prefill_rows(params, tokens, lengths, fields: RowFields, *, config, sampled: bool, top_n: int):
  """Prompts (B, T), right-padded to their bucket, into a cache of T slots; samples each one's first token.

  Returns the cache and _pick's four outputs."""
  logits, cache = decode.prefill_logits(params, tokens, lengths, config, tokens.shape[1])  # (B, V)
  return cache, *_pick(logits, fields, 0, sampled, top_n)


@functools.partial(jax.jit, static_argnames=("config", "top_n"))
def prompt_logprobs(params, tokens, temperature, *, config, top_n: int):
  """Log-probabilities, after temperature, of each prompt token (1, T) given those before it, by the full forward
  pass: (1, T - 1) for tokens 1.., and the top_n alternatives' ids and log-probabilities (1, T - 1, N)."""
  logits, _ = make_forward(config).apply(params, tokens)  # (1, T, V)
  logprobs = jax.nn.log_softmax(logits / jnp.where(temperature > 0, temperature, 1), axis=-1)[:, :-1]  # (1, T-1, V)
  chosen = jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)[..., 0]  # (1, T - 1)
  top_values, top_ids = jax.lax.top_k(logprobs, top_n)  # (1, T - 1, N) x 2
  return chosen, top_ids, top_values


@functools.partial(jax.jit, donate_argnames=("cache",))
def insert_rows(cache: KVCache, new: KVCache, rows) -> KVCache:
  """Prefilled rows' cache (B' rows, T <= S slots) written into rows `rows` (B',) of the shared cache, in place."""
  k, v = cache.k, cache.v
  for i in range(rows.shape[0]):
    at = (0, rows[i], 0, 0, 0)
    k = jax.lax.dynamic_update_slice(k, new.k[:, i:i + 1], at)
    v = jax.lax.dynamic_update_slice(v, new.v[:, i:i + 1], at)
  return KVCache(k, v, cache.end_index.at[rows].set(new.end_index))


@jax.jit
def regroup(cache: KVCache, index) -> KVCache:
  """The cache's rows `index` (B',), in that order: a batch bucket shrunk. Row by row: XLA:CPU copies a row's
  slice as it lies, where a gather of the same rows costs it several times more."""
  def rows(x):  # (L, B, S, G, K) -> (L, B', S, G, K)
    return jnp.concatenate([jax.lax.dynamic_slice_in_dim(x, index[i], 1, axis=1) for i in range(index.shape[0])], 1)
  return KVCache(rows(cache.k), rows(cache.v), cache.end_index[index])


@functools.partial(jax.jit, static_argnames=("rows",))
def grow(cache: KVCache, *, rows: int) -> KVCache:
  """The cache with free rows appended up to `rows`: a batch bucket grown."""
  extra = rows - cache.end_index.shape[0]
  pad = ((0, 0), (0, extra), (0, 0), (0, 0), (0, 0))  # (L, B, S, G, K)
  return KVCache(jnp.pad(cache.k, pad), jnp.pad(cache.v, pad), jnp.pad(cache.end_index, (0, extra)))


@functools.partial(jax.jit, static_argnames=("slots",), donate_argnames=("cache",))
def resize_slots(cache: KVCache, *, slots: int) -> KVCache:
  """The cache with `slots` slots a row: empty ones appended, or the last ones, which no row reaches, dropped."""
  if slots >= cache.k.shape[3]:
    return pad_cache(cache, slots)
  return cache._replace(k=cache.k[:, :, :, :slots], v=cache.v[:, :, :, :slots])  # (L, B, G, S', K) x 2


@functools.partial(jax.jit, static_argnames=("config", "weight_layout", "chunk_steps", "sampled", "top_n"),
                   donate_argnames=("cache",))
def decode_rows(params, cache: KVCache, tokens, fields: RowFields, stop_ids, *, config,
                weight_layout: WeightLayout, chunk_steps: int, sampled: bool, top_n: int):
  """Up to chunk_steps decode steps of every row from its last token (B,); rows stop at a stop id or their budget.

  Returns the cache, the tokens (B, C) (decode.NO_TOKEN once a row is done), their log-probabilities (B, C) and
  alternatives (B, C, N) x 2, and the next call's tokens (B,) and fields (a done row's budget 0): what lets the
  host dispatch the next call before it reads this one's tokens.
  """
  b = tokens.shape[0]
  out = (jnp.full((b, chunk_steps), decode.NO_TOKEN, jnp.int32), jnp.zeros((b, chunk_steps), jnp.float32),
         jnp.zeros((b, chunk_steps, top_n), jnp.int32), jnp.zeros((b, chunk_steps, top_n), jnp.float32))

  def should_continue(carry):
    i, _, _, done, _ = carry
    return (i < chunk_steps) & ~jnp.all(done)

  def step(carry):
    i, cache, tokens, done, out = carry
    logits, cache = decode.step_logits(params, tokens, cache, config, weight_layout)  # (B, V)
    tokens, chosen, top_ids, top_values = _pick(logits, fields, i, sampled, top_n)
    ids, lp, tid, tv = out
    out = (ids.at[:, i].set(jnp.where(done, decode.NO_TOKEN, tokens)), lp.at[:, i].set(chosen),
           tid.at[:, i].set(top_ids), tv.at[:, i].set(top_values))
    done = done | jnp.isin(tokens, stop_ids) | (i + 1 >= fields.budget)
    return i + 1, cache, tokens, done, out

  carry = (jnp.int32(0), cache, tokens, fields.budget <= 0, out)
  steps, cache, tokens, done, out = jax.lax.while_loop(should_continue, step, carry)
  fields = fields._replace(steps=fields.steps + steps, budget=jnp.where(done, 0, fields.budget - steps))
  return cache, *out, tokens, fields


def prefill_groups(lengths: Sequence[int]) -> list[list[int]]:
  """The indices of prompts of these lengths, in the groups they are prefilled in, longest first: only prompts of
  one bucket together (a prompt padded to a longer one's bucket costs that bucket's work), up to PREFILL_ROWS, a
  power of two of them (no padding rows)."""
  buckets = collections.defaultdict(list)
  for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
    buckets[decode.bucket(lengths[i])].append(i)
  groups = []
  for bucket in sorted(buckets, reverse=True):
    rows = buckets[bucket]
    while rows:
      size = min(1 << (len(rows).bit_length() - 1), PREFILL_ROWS)
      groups.append(rows[-size:])
      del rows[-size:]
  return groups


def decode_steps(plan_steps: int, left: Sequence[int], stops: bool, waiting: bool) -> int:
  """Steps of the next decode call: the plan's, or DECODE_CHUNK while no request waits, no row has stop strings
  (the host finds those) and every row has at least that many tokens left to make (`left`), so that no row
  finishes inside the call and no slot stands idle in it. Cancellation still frees a row within one call."""
  if plan_steps > 1 or waiting or stops or min(left) < DECODE_CHUNK:
    return plan_steps
  return DECODE_CHUNK


def _logprobs(chosen: np.ndarray, top_ids: np.ndarray, top_values: np.ndarray) -> list[TokenLogprob]:
  """Host TokenLogprobs from arrays (n,), (n, N), (n, N)."""
  return [TokenLogprob(float(c), tuple(zip(map(int, i), map(float, v))))
          for c, i, v in zip(chosen, top_ids, top_values)]


class Engine:
  """The decode loop's thread and its rows; `submit` from any thread."""

  def __init__(self, generator: Generator, max_seq_len: int, max_queue: int = 64):
    """generator: the model, on one device or sharded over its mesh (the cache and activations follow the
    parameters' shardings); max_seq_len: each sequence's context, at most the model's; max_queue: requests that
    may wait for a row."""
    self.generator = generator
    self.config = generator.config
    self.tokenizer = generator.tokenizer
    self.max_seq_len = max_seq_len
    self.max_queue = max_queue
    self._stop_ids = decode.padded_stop_ids(self.tokenizer.eos_ids)
    self._rows: list[Job | None] = [None]
    self._cache = init_cache(self.config, 1, decode.bucket(1))
    self._waiting: collections.deque[Job] = collections.deque()
    self._condition = threading.Condition()
    self._stopping = False
    self._thread = threading.Thread(target=self._run, name="llama_hk-engine", daemon=True)

  def check(self, request: Request) -> None:
    """Raises UserError for a request this engine cannot run (the API checks the wire format before)."""
    if not request.prompt:
      raise UserError("the prompt is empty")
    if min(request.prompt) < 0 or max(request.prompt) >= self.config.vocab_size:
      raise UserError(f"the prompt has token ids outside [0, {self.config.vocab_size})")
    if len(request.prompt) + request.max_tokens > self.max_seq_len:
      raise UserError(f"the prompt has {len(request.prompt)} tokens: with max_tokens={request.max_tokens} that "
                      f"exceeds the context of {self.max_seq_len} tokens")

  def start(self) -> None:
    self._thread.start()

  def wake(self) -> None:
    with self._condition:
      self._condition.notify()

  def submit(self, requests: Sequence[Request], emit: Callable[[int, Output], None]) -> list[Job]:
    """Queues requests together (all or none: Busy when the queue cannot take them); emit(i, output) gets request
    i's outputs, on the engine's thread."""
    for request in requests:
      self.check(request)
    with self._condition:
      if self._stopping:
        raise Busy("the server is shutting down")
      active = sum(job is not None for job in self._rows)
      waiting = sum(not job.cancelled for job in self._waiting)
      if waiting + len(requests) > self.max_queue + max(self.generator.max_batch - active, 0):
        raise Busy(f"{waiting} requests are waiting (at most {self.max_queue})")
      sequences = [Job(r, functools.partial(emit, i), self) for i, r in enumerate(requests)]
      self._waiting.extend(sequences)
      self._condition.notify()
    return sequences

  def stop(self, timeout: float = 5.0) -> None:
    """Ends every sequence with a final Output (finish_reason "length") and stops the thread."""
    with self._condition:
      self._stopping = True
      self._condition.notify()
    if self._thread.is_alive():
      self._thread.join(timeout)

  def warm_up(self) -> None:
    """Compiles the batch-1 prefill and decode (what /health waits for) by a two-token greedy request."""
    done = threading.Event()
    self.submit([Request((self.tokenizer.bos_id or 0,), 2)], lambda i, out: out.finish_reason and done.set())
    done.wait()

  def _run(self) -> None:
    while True:
      with self._condition:
        while not (self._stopping or self._waiting or any(self._rows)):
          self._condition.wait()
        if self._stopping:
          break
      try:
        self._drop_cancelled()
        self._admit()
        if any(self._rows):
          self._decode()
      except Exception as e:  # The engine must outlive one bad call: its sequences end with the error.
        self._fail(f"{type(e).__name__}: {e}")
    self._finish_all()

  def _fail(self, message: str) -> None:
    for r, seq in enumerate(self._rows):
      if seq is not None:
        seq.emit(Output([], "", finish_reason="error", error=message))
        self._rows[r] = None
    self._rows, self._cache = [None], init_cache(self.config, 1, decode.bucket(1))

  def _finish_all(self) -> None:
    with self._condition:
      waiting, self._waiting = list(self._waiting), collections.deque()
    for seq in [s for s in self._rows if s is not None] + waiting:
      if not seq.cancelled:
        text = seq.row.text.printable(final=True) if seq.row is not None else ""
        seq.emit(Output([], text, [] if seq.request.logprobs else None, finish_reason="length"))
    self._rows = [None]

  def _drop_cancelled(self) -> None:
    with self._condition:
      self._waiting = collections.deque(s for s in self._waiting if not s.cancelled)
    for r, seq in enumerate(self._rows):
      if seq is not None and seq.cancelled:
        self._rows[r] = None
    self._shrink()

  def _shrink(self) -> None:
    """Gathers the rows in use into the smallest bucket that holds them, unless requests wait to fill the free
    ones (a shrink then a grow would copy the cache twice for nothing), and fits the slots to them."""
    used = [r for r, seq in enumerate(self._rows) if seq is not None]
    size = decode.batch_bucket(len(used))
    if size < len(self._rows) and not self._waiting:
      index = used + [0] * (size - len(used))
      self._cache = regroup(self._cache, np.array(index, np.int32))
      self._rows = [self._rows[r] for r in used] + [None] * (size - len(used))
    self._fit_slots()

  def _fit_slots(self, ahead: int = SLOTS_AHEAD) -> None:
    """Resizes the cache to the bucket of what its rows reach within `ahead` tokens: grown to at least twice
    its slots when short (a long completion compiles a few cache sizes, not one every bucket), at most to the
    bucket of the longest prompt + max_tokens; shrunk when that bucket is half its slots or less (rows that
    reached far have left)."""
    active = [seq for seq in self._rows if seq is not None]
    if not active:
      return
    have = self._cache.k.shape[3]
    need = decode.bucket(max(seq.reach(ahead) for seq in active))
    if need > have:
      limit = decode.bucket(max(len(seq.request.prompt) + seq.request.max_tokens for seq in active))
      self._cache = resize_slots(self._cache, slots=min(max(need, decode.bucket(2 * have)), limit))
    elif need <= have // 2:
      self._cache = resize_slots(self._cache, slots=need)

  def _free_row(self) -> int | None:
    """A row for a new sequence: a free one, else the batch grown, once, to the bucket that holds every waiting
    request too (at most max_batch's); None when full. Called with the condition held."""
    active = sum(job is not None for job in self._rows)
    if active >= self.generator.max_batch:
      return None
    if None in self._rows:
      return self._rows.index(None)
    wanted = min(active + sum(job.request.max_tokens > 0 for job in self._waiting), self.generator.max_batch)
    size = decode.batch_bucket(wanted)
    self._cache = grow(self._cache, rows=size)
    self._rows += [None] * (size - len(self._rows))
    return self._rows.index(None)

  def _admit(self) -> None:
    """Takes waiting requests while rows are free (each row reserved for its request) and prefills them, up to
    PREFILL_ROWS at a time, as prefill_groups groups them."""
    admitted = []
    with self._condition:
      while self._waiting:
        seq = self._waiting[0]
        row = self._free_row() if seq.request.max_tokens > 0 else -1
        if row is None:
          break
        self._waiting.popleft()
        if row >= 0:
          self._rows[row] = seq
        admitted.append((seq, row))
    for seq, row in admitted:
      if row < 0:  # max_tokens 0: the prompt's log-probabilities only.
        seq.emit(Output([], "", [] if seq.request.logprobs else None, "length",
                        prompt_logprobs=self._prompt_logprobs(seq.request)))
    rows = [a for a in admitted if a[1] >= 0]
    if rows:
      self._fit_slots()
    for group in prefill_groups([len(seq.request.prompt) for seq, _ in rows]):
      self._prefill([rows[i] for i in group])

  def _fields(self, sequences: Sequence[Job | None]) -> RowFields:
    def column(get, dtype):
      return np.array([get(s) if s is not None else 0 for s in sequences], dtype)
    return RowFields(column(lambda s: s.request.seed, np.int32), column(lambda s: s.request.choice, np.int32),
                     column(lambda s: len(s.row.ids) if s.row else 0, np.int32),
                     column(lambda s: s.request.temperature, np.float32), column(lambda s: s.request.top_k, np.int32),
                     column(lambda s: s.request.top_p, np.float32),
                     column(lambda s: s.request.max_tokens - (len(s.row.ids) if s.row else 0), np.int32))

  def _prompt_logprobs(self, request: Request) -> list[TokenLogprob] | None:
    if not request.prompt_logprobs:
      return None
    length = len(request.prompt)
    tokens = np.zeros((1, decode.bucket(length)), np.int32)
    tokens[0, :length] = request.prompt
    arrays = prompt_logprobs(self.generator.params, tokens, np.float32(request.temperature), config=self.config,
                             top_n=MAX_TOP_LOGPROBS)
    return _logprobs(*(np.asarray(a)[0, :length - 1] for a in arrays))

  def _prefill(self, admitted: Sequence[tuple[Job, int]]) -> None:
    """Prefills sequences into their reserved rows, in one call, and emits each one's first Output."""
    sequences = [seq for seq, _ in admitted]
    lengths = np.array([len(seq.request.prompt) for seq in sequences], np.int32)
    tokens = np.zeros((len(sequences), decode.bucket(int(lengths.max()))), np.int32)  # (B, T)
    for i, seq in enumerate(sequences):
      tokens[i, :lengths[i]] = seq.request.prompt
    prompts = [self._prompt_logprobs(seq.request) for seq in sequences]
    top_n = MAX_TOP_LOGPROBS if any(seq.request.logprobs for seq in sequences) else 0
    cache, *picked = prefill_rows(self.generator.params, tokens, lengths, self._fields(sequences), config=self.config,
                                  sampled=any(seq.request.temperature > 0 for seq in sequences), top_n=top_n)
    self._cache = insert_rows(self._cache, cache, np.array([row for _, row in admitted], np.int32))
    picked = [np.asarray(a) for a in picked]
    for i, ((seq, row), prompt) in enumerate(zip(admitted, prompts)):
      request = seq.request
      seq.row = Row(request.max_tokens, self.tokenizer.eos_ids, IncrementalDetokenizer(self.tokenizer, request.stop))
      self._deliver(row, *(a[i][None] for a in picked), prompt_logprobs=prompt)

  def _deliver(self, r: int, ids, chosen, top_ids, top_values, prompt_logprobs=None) -> None:
    """Row r's new tokens (n,) and their log-probabilities to its sequence; frees the row when it has finished."""
    seq = self._rows[r]
    fresh = seq.row.push(ids)
    if fresh:
      seq.last_token = fresh[-1]
    logprobs = _logprobs(chosen[:len(fresh)], top_ids[:len(fresh)], top_values[:len(fresh)]) \
        if seq.request.logprobs else None
    finish = seq.row.completion().finish_reason if seq.row.finished else None
    if not seq.cancelled:
      seq.emit(Output(fresh, seq.row.printable(), logprobs, finish, prompt_logprobs))
    if seq.row.finished:
      self._rows[r] = None

  def _decode(self) -> None:
    """Decode calls over the current rows until one of them finishes, a request waits, one is cancelled or the
    cache must grow: each call is dispatched from the last one's device outputs before the last one's tokens are
    read, so the host delivers tokens while the device computes."""
    rows = list(self._rows)
    plan, params = self.generator.decode_plan(len(rows))
    sampled = any(s is not None and s.request.temperature > 0 for s in rows)
    top_n = MAX_TOP_LOGPROBS if any(s is not None and s.request.logprobs for s in rows) else 0
    active = [s for s in rows if s is not None]

    def left() -> list[int]:  # Tokens each row may still make, by what the host has read.
      return [s.request.max_tokens - len(s.row.ids) for s in active]

    steps = decode_steps(plan.chunk_steps, left(), any(s.request.stop for s in active), bool(self._waiting))
    self._fit_slots(max(SLOTS_AHEAD, 2 * steps))  # This call and the next fit.
    slots = self._cache.k.shape[3]

    def call(tokens, fields):
      self._cache, *out = decode_rows(params, self._cache, tokens, fields, self._stop_ids, config=self.config,
                                      weight_layout=plan.layout, chunk_steps=steps, sampled=sampled, top_n=top_n)
      return out

    out = call(np.array([s.last_token if s is not None else 0 for s in rows], np.int32), self._fields(rows))
    while out is not None:
      steady = self._rows == rows and not (self._waiting or self._stopping or any(s.cancelled for s in rows if s))
      # A call of `steps` is in flight: the next one of as many needs them left after it, and their slots.
      steady = steady and (steps == plan.chunk_steps or min(left()) >= 2 * steps)
      steady = steady and all(s.reach(2 * steps) <= slots for s in active)
      pending = call(*out[4:]) if steady else None
      ids, chosen, top_ids, top_values = (np.asarray(a) for a in out[:4])
      for r, seq in enumerate(rows):
        if seq is not None and self._rows[r] is seq:  # A row that finished earlier is run on, and dropped.
          self._deliver(r, ids[r], chosen[r], top_ids[r], top_values[r])
      out = pending
    self._shrink()
