"""The serving engine in-process, on a tiny random model: how it groups prefills and chunks decode calls, and that
neither changes a greedy result (transformers' own generate is the reference)."""

import shutil
import threading

import numpy as np
import pytest

from llama_hk.inference import decode
from llama_hk.serving import engine as engine_lib
from llama_hk.serving.engine import DECODE_CHUNK, Engine, Request, decode_steps, prefill_groups


def test_prefill_groups_keep_to_one_bucket_and_powers_of_two():
  lengths = [5, 20, 7, 30, 100, 9, 12, 3]  # Buckets 16, 32, 16, 32, 128, 16, 16, 16.
  groups = prefill_groups(lengths)
  assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
  assert [[lengths[i] for i in g] for g in groups] == [[100], [20, 30], [5, 7, 9, 12], [3]]
  for g in groups:
    assert len({decode.bucket(lengths[i]) for i in g}) == 1 and len(g) & (len(g) - 1) == 0


def test_decode_steps_chunk_only_when_no_row_can_end_or_wait_inside():
  assert decode_steps(1, [DECODE_CHUNK, 40], stops=False, waiting=False) == DECODE_CHUNK
  assert decode_steps(1, [DECODE_CHUNK - 1, 40], stops=False, waiting=False) == 1  # A row would end inside.
  assert decode_steps(1, [40, 40], stops=True, waiting=False) == 1  # Stop strings are found on the host.
  assert decode_steps(1, [40, 40], stops=False, waiting=True) == 1  # A waiting request joins at the next step.
  assert decode_steps(32, [3], stops=False, waiting=False) == 32  # The plan's own chunks (16-bit weights on CPU).


@pytest.fixture(scope="module")
def tiny(tiny_hf_model, smollm2_hf_dir, tmp_path_factory):
  """A random GQA model with SmolLM2's tokenizer: the transformers model and our checkpoint of it."""
  from llama_hk import checkpoints

  model = tiny_hf_model(seed=23, vocab_size=49152, weight_std=0.1, max_position_embeddings=64)
  directory = tmp_path_factory.mktemp("tiny_engine")
  model.save_pretrained(directory)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(smollm2_hf_dir / name, directory / name)
  return model, checkpoints.load(str(directory))


def _greedy(model, prompt, new_tokens):
  """transformers' greedy ids after `prompt`, checked to be well defined (top-2 logit gap > 1e-3 at every step)."""
  import torch

  with torch.no_grad():
    ids = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)[0]
    top2 = model(ids[None]).logits[0, len(prompt) - 1:-1].topk(2).values
  assert (top2[:, 0] - top2[:, 1]).min() > 1e-3
  return ids[len(prompt):].tolist()


def _serve(ckpt, requests, max_batch: int) -> list[list]:
  """Each request's Outputs from an Engine (context 64) that gets them all queued before its loop starts."""
  from llama_hk.inference.generator import Generator

  engine = Engine(Generator(ckpt.config, ckpt.params, ckpt.tokenizer, max_batch=max_batch), max_seq_len=64)
  outputs = [[] for _ in requests]
  done = threading.Event()

  def emit(i, out):
    outputs[i].append(out)
    if all(o and o[-1].finish_reason for o in outputs):
      done.set()

  engine.submit(requests, emit)
  engine.start()
  try:
    assert done.wait(300)
  finally:
    engine.stop()
  return outputs


def test_engine_groups_prefills_by_bucket_and_chunks_decoding(tiny, monkeypatch):
  """Four requests admitted together (prompts in two buckets, 21-24 new tokens): each prefill call holds one bucket's
  prompts only, decoding runs in DECODE_CHUNK-step calls while every row has that many tokens left, and every
  result is transformers' greedy one."""
  model, ckpt = tiny
  prompts = [list(range(100, 100 + n)) for n in (5, 20, 9, 30)]  # Buckets 16, 32, 16, 32.
  new_tokens = [21, 24, 22, 23]
  shapes = []
  prefill = engine_lib.prefill_rows

  def recording(params, tokens, lengths, *args, **kwargs):
    shapes.append((tokens.shape[1], sorted(lengths.tolist())))
    return prefill(params, tokens, lengths, *args, **kwargs)

  monkeypatch.setattr(engine_lib, "prefill_rows", recording)
  outputs = _serve(ckpt, [Request(tuple(p), n) for p, n in zip(prompts, new_tokens)], max_batch=4)
  assert sorted(shapes) == [(16, [5, 9]), (32, [20, 30])]
  sizes = [len(o.ids) for outs in outputs for o in outs]
  assert DECODE_CHUNK in sizes and max(sizes) == DECODE_CHUNK, sizes
  for outs, prompt, n in zip(outputs, prompts, new_tokens):
    ids = [t for o in outs for t in o.ids]
    assert outs[-1].finish_reason == "length" and ids == _greedy(model, prompt, n)
  np.testing.assert_equal([o[-1].error for o in outputs], [None] * 4)


def test_cache_keeps_the_slots_its_rows_may_fill(tiny, monkeypatch):
  """Rows whose prompt + max_tokens lies within SLOTS_AHEAD tokens of their prompt: the cache takes the bucket of
  the longest when such a row is admitted and shrinks when it finishes, so decode steps attend over those slots
  only; every result stays transformers' greedy one."""
  model, ckpt = tiny
  long_prompt, short_prompt = list(range(400, 450)), list(range(500, 505))  # 50 + 4 -> 64 slots; 5 + 20 -> 32.
  slots = []
  decode_rows = engine_lib.decode_rows

  def recording(params, cache, *args, **kwargs):
    slots.append(cache.k.shape[3])
    return decode_rows(params, cache, *args, **kwargs)

  monkeypatch.setattr(engine_lib, "decode_rows", recording)
  outputs = _serve(ckpt, [Request(tuple(long_prompt), 4), Request(tuple(short_prompt), 20)], max_batch=2)
  assert slots[0] == 64 and slots[-1] == 32 and set(slots) == {32, 64}, slots  # Shrunk once the long row ended.
  for outs, prompt, n in zip(outputs, (long_prompt, short_prompt), (4, 20)):
    assert [t for o in outs for t in o.ids] == _greedy(model, prompt, n)


def test_cache_grows_as_a_long_completion_gets_there(tiny, monkeypatch):
  """A request whose max_tokens runs far (the chat default: the rest of the context) starts on the slots its
  prompt and SLOTS_AHEAD more tokens reach, and the cache doubles as it gets there: no call runs on slots its row
  could outgrow inside it, and the result stays transformers' greedy one."""
  model, ckpt = tiny
  monkeypatch.setattr(engine_lib, "SLOTS_AHEAD", 2 * DECODE_CHUNK)  # 16: two chunked calls.
  prompt, new_tokens = list(range(325, 330)), 55  # 5 + 16 -> 32 slots at first; 60 in all -> at most 64.
  calls = []
  decode_rows = engine_lib.decode_rows

  def recording(params, cache, *args, **kwargs):
    calls.append((cache.k.shape[3], int(np.asarray(cache.end_index)[0]), kwargs["chunk_steps"]))
    return decode_rows(params, cache, *args, **kwargs)

  monkeypatch.setattr(engine_lib, "decode_rows", recording)
  [outputs] = _serve(ckpt, [Request(tuple(prompt), new_tokens)], max_batch=1)
  slots = [s for s, _, _ in calls]
  assert slots[0] == 32 and slots[-1] == 64 and slots == sorted(slots) and set(slots) == {32, 64}, calls
  for s, end, steps in calls:  # Slots filled after the call (prompt + new tokens - 1 at most) fit.
    assert min(end + steps, len(prompt) + new_tokens - 1) <= s, calls
  assert [t for o in outputs for t in o.ids] == _greedy(model, prompt, new_tokens)
