"""The lm-evaluation-harness model `llama_hk`: the harness's requests on this project's forward pass and Generator.

The conventions are those of the harness's own `hf` backend, so that the same weights give the same numbers:
`max_length` is the model's max_seq_len unless given; a context and continuation longer than max_length + 1
tokens lose tokens from the left; empty contexts and rolling windows start with `prefix_token_id` (BOS, else
EOS); `add_bos_token` overrides the tokenizer's default; generation stops at EOS or a request's `until`
strings after at most `max_gen_toks` tokens, its context cut from the left to leave room for them.

Log-likelihood requests are sorted by length (longest first) and packed into `batch_size` rows a forward pass, as
many after one another in a row as fit (segment ids keep them apart), a row at least PACK_TOKENS long or the
generation bucket of its longest (`inference.decode.bucket`), so a run compiles a handful of shapes. Requests
with the same context (a multiple-choice document's choices) share it: it is run once per row, each continuation
after it seeing it and itself only (the model's branch ids), which is the same arithmetic on fewer tokens. Over a
mesh, each batch is split over its batch axes and the scores come back replicated. With several processes each
runs every request (the harness sees a world of one) and the processes' batches go through the global mesh in
lockstep.
"""

import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (Collator, handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs,
                                  postprocess_generated_text)
from tqdm import tqdm

from llama_hk import platform, sharding
from llama_hk.config import LlamaConfig
from llama_hk.errors import UserError
from llama_hk.inference import decode
from llama_hk.inference.generator import Generator
from llama_hk.inference.sampling import Sampling
from llama_hk.models import transform_model
from llama_hk.ops import lora as lora_lib
from llama_hk.ops.lora import LoraConfig
from llama_hk.tokenizers.tokenizer import Tokenizer

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256  # The `hf` backend's.
PACK_TOKENS = 128  # The shortest row: requests shorter than this share rows.
HEAD_BLOCK = 128  # Scored positions a block of the LM head takes on a mesh.
VOCAB_BLOCK = 1024  # Token ids a block of the LM head takes on one device.


@functools.lru_cache(maxsize=None)
def _scorer(config: LlamaConfig, lora: LoraConfig | None, mesh, vocab_block: int = VOCAB_BLOCK,
            head_block: int = HEAD_BLOCK):
  """params, tokens, positions, segment_ids, branch_ids (B, T), scored (B, S) time indices and their targets (B, S)
  -> each target's log-probability and whether its logit is the largest (B, S), replicated over `mesh`; a
  request's sum is taken on the host, in float64. The LM head runs at the scored positions only, in blocks, as
  B x S x V float32 logits at once would go out to memory and back for the log-softmax: on one device in blocks of
  VOCAB_BLOCK token ids with a running log-sum-exp (the head's weight read once), on a mesh, where the vocabulary
  may be split over devices and a block of it would be gathered, in blocks of HEAD_BLOCK positions. Greedy is the
  target's logit equal to the largest, without an argmax pass (a tie counts as greedy, where the `hf` backend's
  argmax takes the lowest id)."""

  def score(model, tokens, positions, segment_ids, branch_ids, scored, targets):
    x, _ = model.hidden(tokens, positions, segment_ids, logits_at=scored, branch_ids=branch_ids)  # (B, S, D)
    if mesh is None:
      return _by_vocab_blocks(model, x, targets, vocab_block)
    return _by_position_blocks(model, x, targets, head_block)

  return jax.jit(transform_model(config, score, lora=lora).apply,
                 out_shardings=None if mesh is None else NamedSharding(mesh, PartitionSpec()))


def _by_vocab_blocks(model, x, targets, vocab_block: int):
  """x (B, S, D), targets (B, S) -> log-probabilities, greedy (B, S): the head in blocks of W = vocab_block token
  ids, the last block ending at V (its ids that the block before it covered masked), a running maximum and sum of
  exponentials."""
  vocab = model.config.vocab_size
  width = min(vocab_block, vocab)
  count = -(-vocab // width)

  def block(carry, i):
    top, total, target_logit = carry  # (B, S) each: the largest logit so far, sum of exp(logit - top), the target's
    start = jnp.minimum(i * width, vocab - width)
    logits = model.logits(x, vocab_block=(start, width))  # (B, S, W) float32
    if vocab % width:
      logits = jnp.where(start + jnp.arange(width) >= i * width, logits, -jnp.inf)  # (B, S, W)
    new_top = jnp.maximum(top, logits.max(axis=-1))  # (B, S)
    total = total * jnp.exp(top - new_top) + jnp.exp(logits - new_top[..., None]).sum(axis=-1)  # (B, S)
    here = (targets >= i * width) & (targets < start + width)  # (B, S)
    picked = jnp.take_along_axis(logits, jnp.clip(targets - start, 0, width - 1)[..., None], axis=-1)[..., 0]
    return (new_top, total, jnp.where(here, picked, target_logit)), None

  zeros = jnp.zeros(targets.shape, jnp.float32)  # (B, S)
  (top, total, target_logit), _ = hk.scan(block, (zeros - jnp.inf, zeros, zeros), jnp.arange(count))
  return target_logit - (top + jnp.log(total)), target_logit >= top  # (B, S) x 2


def _by_position_blocks(model, x, targets, head_block: int):
  """x (B, S, D), targets (B, S) -> log-probabilities, greedy (B, S): the head at W <= head_block / B positions of
  each row at a time (S halved while the block passes head_block, so W divides S)."""
  b, s, d = x.shape
  width = s
  while width * b > head_block and width % 2 == 0:
    width //= 2

  def block(_, inputs):
    x, targets = inputs  # (B, W, D), (B, W)
    logits = model.logits(x)  # (B, W, V) float32
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # (B, W)
    return None, (target_logits - jax.nn.logsumexp(logits, axis=-1), target_logits >= logits.max(axis=-1))

  x = x.reshape(b, s // width, width, d).swapaxes(0, 1)  # (S / W, B, W, D)
  targets = targets.reshape(b, s // width, width).swapaxes(0, 1)  # (S / W, B, W)
  _, (logprob, greedy) = hk.scan(block, None, (x, targets))  # (S / W, B, W)
  return tuple(a.swapaxes(0, 1).reshape(b, s) for a in (logprob, greedy))  # (B, S)


def _host(x) -> np.ndarray:
  """A replicated result as NumPy, also when the mesh spans processes."""
  return np.asarray(x.addressable_data(0))


@register_model("llama_hk")
class LlamaHkLM(TemplateLM):
  """A llama_hk model (config, params, tokenizer), params on the default device or sharded over `mesh`."""

  def __init__(self, config: LlamaConfig, params, tokenizer: Tokenizer, *, mesh=None, lora: LoraConfig | None = None,
               batch_size: int | None = None, max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
               add_bos_token: bool | None = None, prefix_token_id: int | None = None, seed: int = 0):
    """batch_size: rows per forward pass (default 8; short requests share rows), rounded up to a multiple of the
    mesh's data x fsdp size; the others as the `hf` backend's arguments of those names."""
    super().__init__()
    shards = sharding.batch_multiple(mesh)
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else int(batch_size)
    if batch_size < 1:
      raise UserError(f"--batch_size={batch_size}: must be at least 1")
    max_length = config.max_seq_len if max_length is None else int(max_length)
    if not 1 < max_length <= config.max_seq_len:
      raise UserError(f"max_length={max_length}: must be in [2, the model's max_seq_len {config.max_seq_len}]")
    self.config, self.tokenizer, self.mesh, self.lora = config, tokenizer, mesh, lora
    self.params = jax.device_put(params, None if mesh is None else sharding.param_shardings(config, mesh, lora=lora))
    self._scoring_params = platform.inference_params(config, self.params)  # The same buffers.
    self._batch_size = -(-batch_size // shards) * shards
    self._max_length = max_length
    self._max_gen_toks = int(max_gen_toks)
    self.add_bos_token = add_bos_token
    self.custom_prefix_token_id = prefix_token_id
    self.seed = seed

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "LlamaHkLM":
    """`--model llama_hk --model_args checkpoint=PATH[,adapter=DIR,compute_dtype=bfloat16,...]` (one device)."""
    from llama_hk import checkpoints

    args = {**lm_utils.simple_parse_args_string(arg_string),
            **{k: v for k, v in (additional_config or {}).items() if k == "batch_size" and v is not None}}
    if "checkpoint" not in args:
      raise UserError("model_args: checkpoint=PATH is required")
    ckpt = checkpoints.load(args.pop("checkpoint"), adapter=args.pop("adapter", None),
                            compute_dtype=args.pop("compute_dtype", "float32"))
    return cls(ckpt.config, ckpt.params, ckpt.tokenizer, lora=ckpt.lora, **args)

  # What the harness asks of a model.

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_id

  @property
  def prefix_token_id(self) -> int:
    if self.custom_prefix_token_id is not None:
      return self.custom_prefix_token_id
    return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def tokenizer_name(self) -> str:
    return self.tokenizer.source.replace("/", "__")

  def chat_template(self, chat_template: bool | str = False) -> str | None:
    return self.tokenizer.chat_template

  def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                 **kwargs) -> list[int]:
    """As the `hf` backend: special tokens as asked, else as add_bos_token says, else the tokenizer's default;
    none when the text already starts with the prefix token."""
    special = add_special_tokens if add_special_tokens is not None else self.add_bos_token
    if add_special_tokens is None and has_bos_prefix(string, self.tok_decode([self.prefix_token_id], False)):
      special = False
    if special is False:
      ids = self.tokenizer.encode(string, add_bos=False, add_eos=False)
    else:
      ids = self.tokenizer.encode(string, add_bos=self.add_bos_token or None)
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
    """(log-probability of the continuation, whether greedy decoding gives it) of each (key, context ids,
    continuation ids), in order."""
    rows = []
    for key, context, continuation in requests:
      if not context or not continuation:
        raise UserError(f"request {key!r}: empty context or continuation tokens")
      whole = (list(context) + list(continuation))[-(self.max_length + 1):]
      rows.append((whole[:-1], whole[1:], min(len(continuation), len(whole) - 1)))
    results: list[tuple[float, bool] | None] = [None] * len(rows)
    score = _scorer(self.config, self.lora, self.mesh)
    batch_sharding = None if self.mesh is None else sharding.batch_sharding(self.mesh)
    with sharding.axis_rules(self.mesh), tqdm(total=len(rows), disable=disable_tqdm or not _main_process(),
                                              desc="loglikelihood requests") as progress:
      for time, batch in self._batches(rows):
        *arrays, spans = self._score_batch(rows, time, batch)
        logprob, greedy = score(self._scoring_params, *(sharding.put_global(a, batch_sharding) for a in arrays))
        logprob, greedy = _host(logprob), _host(greedy)
        for r, i, span in spans:
          results[i] = (float(np.sum(logprob[r, span], dtype=np.float64)), bool(np.all(greedy[r, span])))
          if requests[i][0] is not None:
            self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        progress.update(len(spans))
    return results

  def _prefix_len(self, row) -> int:
    """How many of a request's input tokens may be shared: its context up to the first scored position (whose
    logits every continuation of that context reads), or all of them where the sliding window, which counts time
    indices, not positions, could cut a row's segment (then no two requests share)."""
    inputs, _, scored = row
    window = self.config.sliding_window
    return len(inputs) - scored + 1 if window is None or window >= self.max_length else len(inputs)

  def _batches(self, rows) -> list[tuple[int, list[list[tuple[int, list[int]]]]]]:
    """(T, up to batch_size rows, each a list of segments (start, request indices)): the requests that share a
    prefix (`_prefix_len`) grouped, the prefix stored once per row and each request's remaining inputs after it as
    a branch; groups longest first, each request put into the last row's open segment of its group when it fits,
    else into a new segment after the row's last, else into a new row. T, the bucket of a batch's longest request
    (`inference.decode.bucket`) but at least PACK_TOKENS, capped at max_length, so that short requests share rows
    instead of padding them and a run compiles a handful of shapes."""
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
      groups.setdefault(tuple(row[0][:self._prefix_len(row)]), []).append(i)
    batches, used, time = [], 0, 0
    for prefix, members in sorted(groups.items(), key=lambda group: -max(len(rows[i][0]) for i in group[1])):
      for k, i in enumerate(sorted(members, key=lambda i: -len(rows[i][0]))):
        branch = len(rows[i][0]) - len(prefix)
        if k and used + branch <= time:  # Into this group's segment, the last of the last row.
          batches[-1][1][-1][-1][1].append(i)
          used += branch
          continue
        if not batches or used + len(prefix) + branch > time:
          if batches and len(batches[-1][1]) < self.batch_size:
            batches[-1][1].append([])
          else:
            time = min(max(decode.bucket(len(rows[i][0])), PACK_TOKENS), self.max_length)
            batches.append((time, [[]]))
          used = 0
        batches[-1][1][-1].append((used, [i]))
        used += len(prefix) + branch
    return batches

  def _score_batch(self, rows, time: int, batch) -> tuple:
    """tokens, positions, segment_ids, branch_ids: (R, T), R the batch's rows rounded up to a power of two (a
    multiple of the mesh's batch split, at most batch_size), a row's segments 1, 2, ..., each its prefix (branch 0)
    from position 0, then its requests' branches 1, 2, ... each from the position where the prefix ends, then
    padding (segment 0); scored and targets: (R, S), each row's scored time indices in turn (a request's: the
    prefix's last, then its branch) and their targets, S their bucket (padded with index 0, scoring nothing); and
    each request's (row, index, slice of S). T is cut to the bucket of the longest row where the rows are shorter
    (the last batch)."""
    shards = sharding.batch_multiple(self.mesh)
    height = min(-(-decode.batch_bucket(len(batch)) // shards) * shards, self.batch_size)
    tokens, positions, segment_ids, branch_ids = (np.zeros((height, time), np.int32) for _ in range(4))
    row_scored, row_targets, spans, longest = [], [], [], 0
    for r, row in enumerate(batch):
      at, want = [], []
      for segment, (start, members) in enumerate(row, 1):
        shared = self._prefix_len(rows[members[0]])
        end = start + shared
        tokens[r, start:end], positions[r, start:end] = rows[members[0]][0][:shared], np.arange(shared)
        segment_ids[r, start:end] = segment
        for branch, i in enumerate(members, 1):
          inputs, outputs, scored = rows[i]
          n = len(inputs) - shared
          tokens[r, end:end + n], positions[r, end:end + n] = inputs[shared:], np.arange(shared, shared + n)
          segment_ids[r, end:end + n], branch_ids[r, end:end + n] = segment, branch
          spans.append((r, i, slice(len(at), len(at) + scored)))
          # The request's last `scored` inputs: the prefix's (from `start`), then the branch's (from `end`).
          at.extend(start + v if v < shared else end + v - shared for v in range(len(inputs) - scored, len(inputs)))
          want.extend(outputs[len(inputs) - scored:])
          end += n
        longest = max(longest, end)
      row_scored.append(at)
      row_targets.append(want)
    time = min(time, decode.bucket(longest))  # A batch that its rows do not fill (the last) cut to their bucket.
    tokens, positions, segment_ids, branch_ids = (a[:, :time] for a in (tokens, positions, segment_ids, branch_ids))
    width = decode.bucket(max(map(len, row_scored)))  # Above T where requests share a short prefix.
    scored, targets = (np.zeros((height, width), np.int32) for _ in range(2))
    for r, (at, want) in enumerate(zip(row_scored, row_targets)):
      scored[r, :len(at)], targets[r, :len(want)] = at, want
    return tokens, positions, segment_ids, branch_ids, scored, targets, spans

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Each text's log-probability in disjoint windows of max_length tokens, the first after the prefix token,
    every later one with as much of the text before it as fits (the harness's rolling windows)."""
    owners, windows = [], []
    for i, (string,) in enumerate(request.args for request in requests):
      for window in lm_utils.get_rolling_token_windows(token_list=self.tok_encode(string),
                                                        prefix_token=self.prefix_token_id,
                                                        max_seq_len=self.max_length, context_len=1):
        owners.append(i)
        windows.append((None, *lm_utils.make_disjoint_window(window)))
    totals = [0.0] * len(requests)
    for i, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
      totals[i] += logprob
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Each request's completion: requests with the same generation arguments together, longest context first."""
    eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
    collator = Collator([request.args for request in requests], sort_fn=lambda x: (-len(self.tok_encode(x[0])), x[0]),
                        group_by="gen_kwargs", group_fn=lambda x: x[1])
    results = []
    with tqdm(total=len(requests), disable=disable_tqdm or not _main_process(), desc="generate_until requests") as bar:
      for chunk in collator.get_batched(n=self.batch_size):
        contexts, all_kwargs = zip(*chunk)
        kwargs = normalize_gen_kwargs(dict(all_kwargs[0]), self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        max_gen_toks = kwargs.pop("max_gen_toks")
        if max_gen_toks >= self.max_length:
          raise UserError(f"max_gen_toks={max_gen_toks}: must be less than max_length {self.max_length}")
        room = self.max_length - max_gen_toks
        prompts = [self.tok_encode(context, left_truncate_len=room) or [self.prefix_token_id]
                   for context in contexts]
        completions, _ = self._generator.generate(prompts, max_gen_toks, _sampling(kwargs),
                                                  seed=self.seed + len(results), stop_strings=[s for s in until if s])
        for context, completion in zip(contexts, completions):
          text = postprocess_generated_text(self.tok_decode(completion.ids), until, None)
          results.append(text)
          self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
        bar.update(len(chunk))
    return collator.get_original(results)

  @functools.cached_property
  def _generator(self) -> Generator:
    """Made on the first generation request; decoding takes an adapter folded into a copy of the weights."""
    params = self.params if self.lora is None else lora_lib.merged(self.params, self.lora)
    return Generator(self.config, params, self.tokenizer, max_batch=self.batch_size, mesh=self.mesh)


def _sampling(kwargs: dict) -> Sampling:
  """The harness's normalised generation arguments as a Sampling: greedy unless do_sample with a temperature."""
  if not kwargs.get("do_sample") or not kwargs.get("temperature"):
    return Sampling()
  return Sampling(temperature=float(kwargs["temperature"]), top_k=int(kwargs.get("top_k") or 0),
                  top_p=float(kwargs.get("top_p") or 1.0))


def _main_process() -> bool:
  return jax.process_index() == 0


def task_manager(include_path: str | None = None, include_defaults: bool = True):
  """The harness's task index over its own tasks (unless include_defaults is False) and those under include_path."""
  from lm_eval.tasks import TaskManager

  return TaskManager(include_path=include_path, include_defaults=include_defaults)


def check_tasks(manager, tasks: list[str]) -> None:
  """UserError naming the task names the index does not hold, and how to list those it does."""
  missing = [task for task in tasks if not manager.match_tasks([task])]
  if missing:
    raise UserError(f"--tasks: not found: {', '.join(missing)} (list task names with `lm-eval ls tasks"
                    f"{' --include_path DIR' if manager.include_path else ''}`)")


def evaluate(lm, tasks: list[str], manager, num_fewshot: int | None = None, limit: float | None = None,
             apply_chat_template: bool = False, log_samples: bool = False) -> dict:
  """`lm_eval.simple_evaluate` of `lm` on `tasks` from `manager`: the harness's results dictionary (with
  "samples" when log_samples)."""
  import lm_eval

  check_tasks(manager, tasks)
  return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                                 log_samples=log_samples, apply_chat_template=apply_chat_template,
                                 bootstrap_iters=0)


def results_table(results: dict) -> str:
  """The harness CLI's tables: tasks, then groups if any."""
  from lm_eval.utils import make_table

  return make_table(results) + (make_table(results, "groups") if "groups" in results else "")


def results_json(results: dict) -> str:
  """The results dictionary as the harness CLI writes it (its `handle_non_serializable` for what JSON lacks)."""
  import json
  from lm_eval.utils import handle_non_serializable

  return json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
