"""Generation: greedy ids equal transformers' generate, the KV cache path equals the full forward pass, batching
changes nothing, sampling draws from the filtered softmax, streamed text never shows a stop string, the chat loop
keeps its conversation, and bad input fails in one line (library and binary)."""

import io
import json
import math
import pathlib
import re
import subprocess
import sys
from concurrent import futures

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from llama_hk import checkpoints
from llama_hk import inference
from llama_hk import platform
from llama_hk import sharding
from llama_hk.config import LlamaConfig
from llama_hk.errors import UserError
from llama_hk.inference import decode
from llama_hk.inference.sampling import Sampling, top_p_threshold
from llama_hk.models import make_forward
from llama_hk.ops.dense import to_layout
from llama_hk.tokenizers.tokenizer import Tokenizer
from harness import assert_one_line_error
from reference import hf_greedy, ours_from_hf

REPO = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 288  # Room for the GGUF test tokenizer.
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def smollm2(smollm2_hf_dir):
  """Ours (loaded by checkpoints.load from the HF copy) and transformers' SmolLM2, both float32."""
  import transformers
  ckpt = checkpoints.load(smollm2_hf_dir)
  hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
  return ckpt, hf


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(smollm2):
  """Three prompts in one batch (one through the chat template, which ends at EOS) against transformers one by one."""
  ckpt, hf = smollm2
  tok = ckpt.tokenizer
  prompts = [inference.prompt_ids(tok, "The three primary colors are"),
             inference.prompt_ids(tok, "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"),
             inference.prompt_ids(tok, "What is the capital of France?", chat=True)]
  generator = inference.Generator(ckpt.config, ckpt.params, tok)
  completions, stats = generator.generate(prompts, max_new_tokens=48)
  for prompt, completion in zip(prompts, completions):
    expected = hf_greedy(hf, prompt, 48, eos=tok.eos_id)
    assert completion.ids == expected
  assert completions[2].finish_reason == "stop" and completions[2].ids[-1] == tok.eos_id
  assert len(completions[2].ids) < 48 and completions[2].text == "The capital of France is Paris."
  assert [c.finish_reason for c in completions[:2]] == ["length", "length"]
  assert stats.generated_tokens == sum(len(c.ids) for c in completions)
  assert completions[0].text == tok.decode(completions[0].ids)


@pytest.mark.slow
@pytest.mark.parametrize("fields", [
    dict(seed=11, num_attention_heads=4, num_key_value_heads=2),
    dict(seed=12, num_attention_heads=6, num_key_value_heads=1, hidden_size=96, tie_word_embeddings=True),
    dict(seed=13, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=3, random_norms=True),
], ids=["gqa", "mqa_tied", "mha"])
def test_random_models_greedy_match_transformers(tiny_hf_model, fields):
  """Batched prompts of different lengths, no EOS: 40 greedy tokens each, equal to transformers' one by one."""
  hf = tiny_hf_model(**fields)
  config, params = ours_from_hf(hf)
  rng = np.random.default_rng(fields["seed"])
  prompts = [rng.integers(3, config.vocab_size, size=n).tolist() for n in (5, 17, 1)]
  completions, _ = inference.Generator(config, params).generate(prompts, max_new_tokens=40)
  for prompt, completion in zip(prompts, completions):
    assert completion.ids == hf_greedy(hf, prompt, 40, eos=None)


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True], ids=["lm_head", "tied"])
def test_cached_decode_logits_equal_full_forward(tiny_hf_model, tied):
  """Through generation's prefill (right-padded rows) and decode steps, every step's logits equal the full
  forward pass at that position; the decode steps run on the batch-1 CPU weight layout, as a batch of one does."""
  hf = tiny_hf_model(seed=21, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
  config, params = ours_from_hf(hf)
  weight_layout = platform.CPU_MATVEC_LAYOUT
  decode_params = to_layout(params, weight_layout)
  layers, d, heads, head_dim = params["decoder/attention"]["q_proj"].shape  # (L, D, N, K); out_in: (L, N * K, D)
  assert decode_params["decoder/attention"]["q_proj"].shape == (layers, heads * head_dim, d)
  rng = np.random.default_rng(21)
  lengths = np.array([3, 9, 6], np.int32)
  steps = 12
  sequences = rng.integers(0, config.vocab_size, size=(3, lengths.max() + steps)).astype(np.int32)
  tokens = np.where(np.arange(lengths.max())[None] < lengths[:, None], sequences[:, :lengths.max()], 0)
  full, _ = make_forward(config).apply(params, jnp.asarray(sequences))  # (B, T + steps, V)
  prefill = jax.jit(decode.prefill_logits, static_argnums=(3, 4))
  step = jax.jit(decode.step_logits, static_argnums=(3, 4))
  logits, cache = prefill(params, tokens, lengths, config, 32)
  worst = 0.0
  for k in range(steps):
    at = lengths + k - 1  # The position whose logits these are.
    expected = np.asarray(full)[np.arange(3), at]
    worst = max(worst, float(np.abs(np.asarray(logits) - expected).max()))
    logits, cache = step(decode_params, jnp.asarray(sequences[np.arange(3), lengths + k]), cache, config,
                         weight_layout)
  print(f"cached vs full forward: max abs logits diff {worst:.2e}")
  assert worst <= 1e-4
  np.testing.assert_array_equal(np.asarray(cache.end_index), lengths + steps)


@pytest.fixture(scope="module")
def tiny(tiny_hf_model):
  hf = tiny_hf_model(seed=31, vocab_size=VOCAB, num_attention_heads=4, num_key_value_heads=2)
  config, params = ours_from_hf(hf)
  return config, params


@pytest.mark.slow
def test_batched_equals_unbatched(tiny):
  config, params = tiny
  rng = np.random.default_rng(5)
  prompts = [rng.integers(3, config.vocab_size, size=n).tolist() for n in (2, 30, 7, 15, 1)]
  batched, _ = inference.Generator(config, params).generate(prompts, max_new_tokens=24)
  grouped, stats = inference.Generator(config, params, max_batch=2, chunk_steps=5).generate(prompts, max_new_tokens=24)
  assert stats.batches == 3
  for prompt, row, row_grouped in zip(prompts, batched, grouped):
    [alone], _ = inference.Generator(config, params).generate([prompt], max_new_tokens=24)
    assert row.ids == alone.ids == row_grouped.ids


COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # Recorded once per XLA compilation.


def test_each_bucket_compiles_once(tiny):
  """A second call in the same buckets (other prompt ids and lengths, seed, max_new_tokens) compiles nothing; a
  call in a new batch bucket compiles (the control)."""
  config, params = tiny
  generator = inference.Generator(config, params, chunk_steps=4)
  generator.generate([[5, 6, 7]], max_new_tokens=9, seed=1)  # Batch 1, prompt bucket 16, cache 16.
  compiles = []
  listener = lambda event, duration, **kwargs: compiles.append(event) if event == COMPILE_EVENT else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    [again], _ = generator.generate([[9, 10, 11, 12, 13]], max_new_tokens=11, seed=2)
    assert compiles == [] and len(again.ids) == 11
    generator.generate([[5], [6, 7]], max_new_tokens=9)  # Batch bucket 2.
    assert compiles
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.slow
def test_top_k_1_is_greedy_and_seeds_reproduce(tiny):
  config, params = tiny
  generator = inference.Generator(config, params, chunk_steps=4)
  prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
  greedy, _ = generator.generate(prompts, max_new_tokens=20)
  top1, _ = generator.generate(prompts, max_new_tokens=20, sampling=Sampling(temperature=0.7, top_k=1), seed=3)
  assert [c.ids for c in top1] == [c.ids for c in greedy]
  hot = Sampling(temperature=1.5, top_p=0.95)
  first, _ = generator.generate(prompts, max_new_tokens=20, sampling=hot, seed=7)
  again, _ = generator.generate(prompts, max_new_tokens=20, sampling=hot, seed=7)
  other, _ = generator.generate(prompts, max_new_tokens=20, sampling=hot, seed=8)
  assert [c.ids for c in first] == [c.ids for c in again]
  assert [c.ids for c in first] != [c.ids for c in other]


def _filtered_softmax(logits: np.ndarray, sampling: Sampling) -> np.ndarray:
  """transformers' recipe, written with a sort: temperature, top-k, then top-p (keep while the mass before < p)."""
  z = logits.astype(np.float64) / sampling.temperature
  if sampling.top_k:
    z = np.where(z >= np.sort(z)[-sampling.top_k], z, -np.inf)
  p = np.exp(z - z.max())
  p /= p.sum()
  order = np.argsort(-p, kind="stable")
  before = np.cumsum(p[order]) - p[order]
  keep = np.zeros_like(p, bool)
  keep[order[before < sampling.top_p]] = True
  p = np.where(keep, p, 0)
  return p / p.sum()


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [
    Sampling(temperature=1.0), Sampling(temperature=0.6, top_k=12), Sampling(temperature=1.3, top_p=0.7),
    Sampling(temperature=2.0, top_k=40, top_p=0.9)], ids=["t1", "t0.6_k12", "t1.3_p0.7", "t2_k40_p0.9"])
def test_sampling_matches_filtered_softmax(tiny, sampling):
  """4096 first tokens of one prompt (one row each) against the expected distribution: no draw outside the kept
  set, and Pearson's chi-square below its 1 - 1e-5 quantile (Wilson-Hilferty), with bins of expected count < 5
  pooled. The seed is fixed, so the outcome is too."""
  config, params = tiny
  prompt = [17, 99, 4, 250, 31]
  draws = 4096
  completions, _ = inference.Generator(config, params, max_batch=draws).generate([prompt] * draws, max_new_tokens=1,
                                                                            sampling=sampling, seed=1234)
  counts = np.bincount([c.ids[0] for c in completions], minlength=config.vocab_size)
  logits, _ = make_forward(config).apply(params, jnp.asarray([prompt]))
  expected = _filtered_softmax(np.asarray(logits)[0, -1], sampling) * draws
  assert counts[expected == 0].sum() == 0
  kept = expected > 0
  big = kept & (expected >= 5)
  observed_bins = np.append(counts[big], counts[kept & ~big].sum())
  expected_bins = np.append(expected[big], expected[kept & ~big].sum())
  if expected_bins[-1] == 0:
    observed_bins, expected_bins = observed_bins[:-1], expected_bins[:-1]
  chi2 = float((((observed_bins - expected_bins) ** 2) / expected_bins).sum())
  df = len(expected_bins) - 1
  z = 4.265  # Standard normal 1 - 1e-5 quantile.
  bound = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
  print(f"{sampling}: {kept.sum()} tokens kept, chi2 {chi2:.1f} (df {df}, bound {bound:.1f})")
  assert chi2 < bound


def test_top_p_threshold_is_exact():
  probs = jnp.asarray([[0.5, 0.2, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [1.0, 0, 0, 0]], jnp.float32)
  expected = {0.7: [0.2, 0.25, 1.0], 0.5: [0.5, 0.25, 1.0]}  # Exactly p_m, as float32.
  for top_p, thresholds in expected.items():
    np.testing.assert_array_equal(np.asarray(top_p_threshold(probs, top_p))[:, 0],
                                  np.asarray(thresholds, np.float32))


def test_padded_batch_buckets_and_memory_report():
  batch = decode.PaddedBatch.build([[1, 2, 3], [4] * 20, [5]], max_new_tokens=500, stop_ids=[7, 8])
  assert batch.tokens.shape == (4, 32) and batch.cache_len == 1024 and batch.lengths.tolist() == [3, 20, 1, 0]
  assert batch.tokens[1].tolist() == [4] * 20 + [0] * 12 and batch.stop_ids.tolist() == [7, 8] + [-1] * 6
  assert [decode.bucket(n) for n in (1, 17, 512, 513)] == [16, 32, 512, 1024]
  assert decode.cache_shape(5, 2048) == (8, 2048) and decode.batch_bucket(1) == 1
  config = LlamaConfig(vocab_size=VOCAB, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=128,
                       max_seq_len=600, compute_dtype="bfloat16")
  report = inference.memory_report(config, sharding.make_mesh(devices=jax.devices()[:1]), max_batch=3)
  assert report["kv_cache_rows"] == 4 and report["kv_cache_slots"] == 1024 and report["devices"] == 1
  assert report["kv_cache_bytes_per_device"] == 4 * 1024 * 2 * 2 * 16 * 2 * 2  # (L, B, G, S, K), keys and values.
  assert report["param_bytes_per_device"] == report["param_bytes_total"] > 0


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_hf_model, write_tiny_gguf) -> pathlib.Path:
  """A tiny random model with a byte-level BPE tokenizer, as a GGUF file."""
  path = tmp_path_factory.mktemp("generate") / "tiny.gguf"
  write_tiny_gguf(path, tiny_hf_model(seed=41, vocab_size=VOCAB, max_position_embeddings=64))
  return path


def test_stop_ids_stop_strings_and_streaming(tiny_gguf):
  ckpt = checkpoints.load(tiny_gguf)
  generator = inference.Generator(ckpt.config, ckpt.params, ckpt.tokenizer)
  prompt = inference.prompt_ids(ckpt.tokenizer, "the hen")
  [free], _ = generator.generate([prompt], max_new_tokens=30, use_eos=False)
  assert free.finish_reason == "length" and len(free.ids) == 30

  stop_id = free.ids[10]
  [by_id], _ = generator.generate([prompt], max_new_tokens=30, stop_ids=[stop_id], use_eos=False)
  assert by_id.ids == free.ids[:free.ids.index(stop_id) + 1] and by_id.finish_reason == "stop"

  stop = free.text[len(free.text) // 2:][:3]
  streamed = []
  [by_text], _ = generator.generate([prompt], max_new_tokens=30, stop_strings=[stop], use_eos=False,
                                    on_tokens=lambda row, ids, text: streamed.append((row, ids, text)))
  assert stop not in by_text.text and by_text.text == free.text[:free.text.index(stop)]
  assert by_text.finish_reason == "stop" and by_text.ids == free.ids[:len(by_text.ids)]
  assert "".join(text for _, _, text in streamed) == by_text.text
  assert sum((ids for _, ids, _ in streamed), []) == by_text.ids


class _PieceTokenizer:
  """Each id is a piece of UTF-8 bytes; decoding a run that ends inside a character ends in U+FFFD, as
  byte-level BPE and SentencePiece byte fallback do."""

  def __init__(self, pieces: list[bytes]):
    self.pieces = pieces

  def decode(self, ids: list[int]) -> str:
    return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def _detokenize(pieces: list[bytes], stop_strings: list[str]) -> tuple[inference.IncrementalDetokenizer, list[str]]:
  """Pushes every piece in turn (until a stop string), then finishes; returns the detokenizer and what it printed."""
  text = inference.IncrementalDetokenizer(_PieceTokenizer(pieces), stop_strings)
  printed = []
  for token in range(len(pieces)):
    text.push(token)
    if text.stopped:
      break
    printed.append(text.printable(final=False))
  text.finish()
  printed.append(text.printable(final=True))
  return text, printed


def test_incremental_detokenizer_holds_back_partial_characters_and_stop_strings():
  # "ï" and "€" split across two tokens each; the stop string "STOP" across two pushes ("ST", "OP").
  pieces = [b"na", b"\xc3", b"\xafve ", b"\xe2\x82", b"\xac end ST", b"OP after"]
  text, printed = _detokenize(pieces, ["STOP"])
  assert text.stopped and text.text == "na\u00efve \u20ac end "
  assert all("\ufffd" not in piece and "S" not in piece for piece in printed), printed
  assert printed[1] == "" and printed[4] == "\u20ac end " and "".join(printed) == text.text
  # A held-back beginning that does not become the stop string is printed once the next token rules it out.
  text, printed = _detokenize([b"a ST", b"ar", b"\xe2\x82"], ["STOP"])
  assert not text.stopped and printed[:2] == ["a ", "STar"] and "".join(printed) == text.text == "a STar\ufffd"


@pytest.fixture(scope="module")
def tiny_chat_dir(tiny_gguf, tmp_path_factory) -> pathlib.Path:
  """The tiny GGUF model as an HF directory whose tokenizer has a ChatML template."""
  ckpt = checkpoints.load(tiny_gguf, on_device=False)
  tokenizer_config = json.loads(ckpt.tokenizer.files["tokenizer_config.json"])
  tokenizer_config["chat_template"] = CHATML
  files = {**ckpt.tokenizer.files, "tokenizer_config.json": json.dumps(tokenizer_config).encode()}
  path = tmp_path_factory.mktemp("generate") / "tiny_chat"
  checkpoints.export_hf(path, ckpt.config, ckpt.params, Tokenizer(files))
  return path


def test_chat_keeps_the_conversation(tiny_chat_dir):
  tokenizer = Tokenizer.from_dir(tiny_chat_dir)
  chat = inference.Chat(tokenizer)
  first = chat.prompt_ids("hi there")
  chat.add_reply("hello")
  second = chat.prompt_ids("the end")
  assert second[:len(first)] == first and first[0] == tokenizer.bos_id  # <|im_start|> is the BOS here.
  assert tokenizer.decode(second).endswith("<|im_start|>user\nthe end<|im_end|>\n<|im_start|>assistant\n")
  assert "<|im_start|>assistant\nhello<|im_end|>" in tokenizer.decode(second)


@pytest.mark.slow
def test_run_chat_streams_each_reply_and_keeps_the_conversation(tiny_chat_dir):
  ckpt = checkpoints.load(tiny_chat_dir)
  generator = inference.Generator(ckpt.config, ckpt.params, ckpt.tokenizer, chunk_steps=2)
  stdout, stats_out = io.StringIO(), io.StringIO()
  records, stats = inference.run_chat(generator, io.StringIO("the hen\n\nthe\n"), stdout, stats_out,
                                      max_new_tokens=4)
  assert [turn for turn, _ in records] == ["the hen", "the"]  # The blank line is skipped.
  assert stdout.getvalue() == "".join(completion.text + "\n" for _, completion in records)
  assert stats_out.getvalue().count("time to first token") == 2 and stats.batches == 2
  assert stats.generated_tokens == sum(len(completion.ids) for _, completion in records)
  chat = inference.Chat(ckpt.tokenizer)
  first = chat.prompt_ids("the hen")
  chat.add_reply(records[0][1].text)
  assert stats.prompt_tokens == len(first) + len(chat.prompt_ids("the"))  # The second turn saw the first.


def test_bad_input_raises_user_error(tiny, tiny_gguf):
  config, params = tiny
  generator = inference.Generator(config, params)
  cases = {
      "the prompt is empty": lambda: inference.prompt_ids(checkpoints.load(tiny_gguf).tokenizer, ""),
      "prompt 1 is empty": lambda: generator.generate([[4], []], max_new_tokens=4),
      "no prompts": lambda: generator.generate([], max_new_tokens=4),
      "exceeds the model's max_seq_len=512": lambda: generator.generate([[4] * 500], max_new_tokens=13),
      "max_new_tokens=0": lambda: generator.generate([[4]], max_new_tokens=0),
      "temperature=-0.5": lambda: Sampling(temperature=-0.5),
      "top_p=0": lambda: Sampling(top_p=0),
      "top_p=1.5": lambda: Sampling(top_p=1.5),
      "top_k=-1": lambda: Sampling(top_k=-1),
      "outside [0, 288)": lambda: generator.generate([[4, 300]], max_new_tokens=4),
      "stop strings need a tokenizer": lambda: generator.generate([[4]], max_new_tokens=4, stop_strings=["x"]),
  }
  for message, call in cases.items():
    with pytest.raises(UserError, match=re.escape(message)):
      call()
  generator.generate([[4] * 500], max_new_tokens=12)  # Exactly max_seq_len is fine.


def _run(args, stdin=None, cache_dir=None):
  cache = [f"--compilation_cache_dir={cache_dir}"] if cache_dir else ["--compilation_cache_dir="]
  return subprocess.run([sys.executable, str(REPO / "bin" / "generate"), *args, *cache], input=stdin,
                        capture_output=True, text=True, timeout=300, cwd=REPO)


@pytest.mark.slow
def test_binary(tiny_gguf, tiny_chat_dir, tmp_path):
  """Good runs (single prompt streamed + JSON, a prompt file, an interactive chat) and bad input, in parallel."""
  out_json = tmp_path / "out.json"
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("the hen\nthe\n")
  blank = tmp_path / "blank.txt"
  blank.write_text("the hen\n\nthe\n")
  ckpt = f"--checkpoint={tiny_gguf}"
  jobs = {
      "single": ([ckpt, "--prompt=the hen", "--max_new_tokens=12", "--temperature=0.8", "--top_k=20",
                  f"--output_json={out_json}"], None, tmp_path / "jax_cache"),
      "file": ([ckpt, f"--prompt_file={prompts}", "--max_new_tokens=5"], None, None),
      "interactive": ([f"--checkpoint={tiny_chat_dir}", "--interactive", "--max_new_tokens=4",
                       "--gin_bindings=generate_main.chunk_steps = 2"], "the hen\n\nthe\n", None),
      "temperature": ([ckpt, "--prompt=x", "--temperature=-1"], None, None),
      "top_p": ([ckpt, "--prompt=x", "--top_p=0"], None, None),
      "top_k": ([ckpt, "--prompt=x", "--top_k=-3"], None, None),
      "empty": ([ckpt, "--prompt="], None, None),
      "too_long": ([ckpt, "--prompt=the hen", "--max_new_tokens=64"], None, None),
      "missing": (["--checkpoint=/no/such/ckpt", "--prompt=x"], None, None),
      "blank_line": ([ckpt, f"--prompt_file={blank}"], None, None),
      "no_prompt": ([ckpt], None, None),
  }
  with futures.ThreadPoolExecutor(2) as pool:
    runs = {name: pool.submit(_run, *job) for name, job in jobs.items()}
    runs = {name: run.result() for name, run in runs.items()}

  good = runs.pop("single")
  assert good.returncode == 0, good.stderr
  result = json.loads(out_json.read_text())
  [row] = result["results"]
  assert row["prompt"] == "the hen" and len(row["ids"]) == 12 and good.stdout == row["completion"] + "\n"
  assert row["finish_reason"] == "length"
  assert result["stats"]["generated_tokens"] == 12 and result["stats"]["prompt_tokens"] > 0
  assert "time to first token" in good.stderr and "tokens/s" in good.stderr
  assert any((tmp_path / "jax_cache").iterdir())  # The persistent compilation cache was written.
  assert not list(tmp_path.glob(".out.json.*"))
  file_run = runs.pop("file")
  assert file_run.returncode == 0, file_run.stderr
  assert file_run.stdout.count("\n\n") >= 2
  chat = runs.pop("interactive")
  assert chat.returncode == 0, chat.stderr
  assert chat.stderr.count("time to first token") == 2  # Two turns; the blank line is skipped.

  expected = {
      "temperature": "temperature=-1.0: must be >= 0", "top_p": "top_p=0.0: must be in (0, 1]",
      "top_k": "top_k=-3: must be >= 0", "empty": "the prompt is empty",
      "too_long": "exceeds the model's max_seq_len=64", "missing": "/no/such/ckpt: no such file or directory",
      "blank_line": f"{blank}:2: empty prompt", "no_prompt": "give either --prompt",
  }
  for name, message in expected.items():
    assert_one_line_error(runs[name], message)
    assert runs[name].stdout == ""


@pytest.mark.slow
def test_binary_chat_stop_and_weights(tiny_chat_dir, tmp_path):
  """--chat wraps the prompt in the chat template, --weights=int8 decodes the int8 model, --stop ends the completion
  before its stop string with finish_reason "stop": the JSON row is the library's run of the same, and each flag
  changes what the library would give without it."""
  model = checkpoints.load(tiny_chat_dir, dtype="int8")
  tokenizer = model.tokenizer
  generator = inference.Generator(model.config, model.params, tokenizer)
  chat_ids = inference.prompt_ids(tokenizer, "e", chat=True)
  [free], _ = generator.generate([chat_ids], max_new_tokens=36)
  stop = re.findall(r"<extra_\d+>", free.text)[-1]  # An added token's text, whole.
  [expected], _ = generator.generate([chat_ids], max_new_tokens=36, stop_strings=[stop])
  assert free.finish_reason == "length" and expected.finish_reason == "stop" and stop not in expected.text
  [plain], _ = generator.generate([inference.prompt_ids(tokenizer, "e")], max_new_tokens=36)
  float32 = checkpoints.load(tiny_chat_dir)
  [unquantized], _ = inference.Generator(float32.config, float32.params, tokenizer).generate([chat_ids], 36)
  assert plain.ids[:len(expected.ids)] != expected.ids and unquantized.ids[:len(expected.ids)] != expected.ids

  out_json = tmp_path / "out.json"
  run = _run([f"--checkpoint={tiny_chat_dir}", "--chat", "--prompt=e", "--weights=int8", f"--stop={stop}",
              "--max_new_tokens=36", f"--output_json={out_json}"])
  assert run.returncode == 0, run.stderr[-2000:]
  [row] = json.loads(out_json.read_text())["results"]
  assert row == {"prompt": "e", "completion": expected.text, "ids": expected.ids, "finish_reason": "stop"}
  assert run.stdout == expected.text + "\n"
