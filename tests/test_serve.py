"""bin/serve with the real SmolLM2, through the official openai client: one server for the module, on 127.0.0.1.

Greedy results against bin/generate's, concurrent requests against each one alone, log-probabilities against our
full forward pass and transformers', cancellation, a full queue, bad requests, seeded samples, and SIGTERM last.
"""

import asyncio
import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import http.client
import urllib.parse
import numpy as np
import openai
import pytest

import eval_tasks
import harness

REPO = pathlib.Path(__file__).resolve().parents[1]
MODEL = "smollm2"
MAX_BATCH = 4
MAX_QUEUE = 16
MAX_SEQ_LEN = 256
STARTUP_S = 240
COMPLETION_PROMPTS = ["The quality of mercy is not strained; it droppeth as the gentle rain",
                      "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar"]
CHAT_PROMPT = "Write a long story about a king who loses his crown."

pytestmark = pytest.mark.slow


def _request(url: str, method: str, path: str, body: str | None = None) -> tuple[int, dict, dict | None]:
  """One plain HTTP request (no client library's checks): status, headers and JSON body."""
  address = urllib.parse.urlsplit(url)
  connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
  try:
    connection.request(method, path, body, {"content-type": "application/json"} if body is not None else {})
    response = connection.getresponse()
    data = response.read()
    return response.status, dict(response.headers.items()), json.loads(data) if data else None
  finally:
    connection.close()


class Server:
  def __init__(self, process: subprocess.Popen, url: str):
    self.process, self.url = process, url
    self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)

  def async_client(self) -> openai.AsyncOpenAI:
    """A client for one asyncio.run (its connections belong to that event loop)."""
    return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=120)


@contextlib.contextmanager
def serving(checkpoint, *flags: str, env: dict | None = None):
  """bin/serve on `checkpoint` at a free port, once /health says 200 (503 seen first); killed and reaped after."""
  process = subprocess.Popen([sys.executable, str(REPO / "bin" / "serve"), f"--checkpoint={checkpoint}",
                              "--port=0", f"--model_name={MODEL}", *flags], env={**os.environ, **(env or {})},
                             stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO)
  try:
    first = process.stderr.readline()
    assert first.startswith(f"serving {MODEL} on http://127.0.0.1:"), first
    url = first.split()[-1]
    deadline = time.monotonic() + STARTUP_S
    statuses = []
    while time.monotonic() < deadline and process.poll() is None:
      try:
        statuses.append(_request(url, "GET", "/health")[0])
      except OSError:
        statuses.append(None)
      if statuses[-1] == 200:
        break
      time.sleep(0.5)
    assert statuses[-1] == 200, (statuses[-5:], process.poll())
    assert 503 in statuses  # Not ready while loading and compiling.
    yield Server(process, url)
  finally:
    if process.poll() is None:
      process.kill()
    process.wait(timeout=30)
    process.stderr.close()


@pytest.fixture(scope="module")
def server(smollm2_hf_dir):
  with serving(smollm2_hf_dir, f"--max_batch={MAX_BATCH}", f"--max_queue={MAX_QUEUE}",
               f"--max_seq_len={MAX_SEQ_LEN}") as s:
    yield s


@pytest.fixture(scope="module")
def generated(smollm2_hf_dir, tmp_path_factory):
  """bin/generate's greedy results in one run: the completion prompts, then the chat prompt as its chat template
  renders it (the same ids as `bin/generate --chat`, checked here)."""
  from llama_hk.inference.chat import template_ids
  from llama_hk.tokenizers.tokenizer import Tokenizer

  tokenizer = Tokenizer.from_dir(smollm2_hf_dir)
  messages = [{"role": "user", "content": CHAT_PROMPT}]
  chat = tokenizer.apply_chat_template(messages)
  assert tokenizer.encode(chat) == template_ids(tokenizer, messages)
  path = tmp_path_factory.mktemp("generate") / "out.json"
  run = subprocess.run([sys.executable, str(REPO / "bin" / "generate"), f"--checkpoint={smollm2_hf_dir}",
                        "--max_new_tokens=48", "--temperature=0", f"--output_json={path}",
                        *[f"--prompt={p}" for p in [*COMPLETION_PROMPTS, chat]]],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
  assert run.returncode == 0, run.stderr
  results = json.loads(path.read_text())["results"]
  return {"plain": results[:-1], "chat": results[-1:]}


def test_models_and_health(server):
  assert [m.id for m in server.client.models.list().data] == [MODEL]
  assert _request(server.url, "GET", "/health")[::2] == (200, {"status": "ok"})


def test_greedy_completions_and_chat_equal_bin_generate(server, generated):
  for prompt, expected in zip(COMPLETION_PROMPTS, generated["plain"]):
    assert len(expected["ids"]) == 48
    r = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=48, temperature=0,
                                         extra_body={"return_token_ids": True})
    [choice] = r.choices
    assert choice.model_extra["token_ids"] == expected["ids"] and choice.text == expected["completion"]
    assert choice.finish_reason == "length" and r.usage.completion_tokens == 48
    stream = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=48, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == expected["completion"]

  [expected] = generated["chat"]
  assert len(expected["ids"]) == 48
  messages = [{"role": "user", "content": CHAT_PROMPT}]
  r = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=48, temperature=0,
                                            extra_body={"return_token_ids": True})
  assert r.choices[0].model_extra["token_ids"] == expected["ids"]
  assert r.choices[0].message.content == expected["completion"]
  stream = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=48, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
  chunks = list(stream)
  assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected["completion"]
  assert chunks[-1].usage.completion_tokens == 48 and chunks[-1].choices == []


def _shakespeare_prompts(shakespeare_dir, count: int) -> list[str]:
  lines = [line.strip() for line in (shakespeare_dir / "lear.txt").read_text().splitlines() if len(line) > 30]
  return lines[100:100 + count]


def test_concurrent_requests_equal_their_solo_results(server, shakespeare_dir):
  """16 requests at once (4 rows, 12 waiting) return what each returns alone, on prompts whose top-2 log-probability
  gap (the logit gap) exceeds 1e-3 at every step."""
  prompts = _shakespeare_prompts(shakespeare_dir, 16)
  lengths = [6 + (3 * i) % 13 for i in range(16)]
  solo, gaps = [], []
  for prompt, n in zip(prompts, lengths):
    r = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, logprobs=2,
                                         extra_body={"return_token_ids": True})
    solo.append(r.choices[0].model_extra["token_ids"])
    tops = [sorted(top.values(), reverse=True) for top in r.choices[0].logprobs.top_logprobs]
    gaps.append(min(t[0] - t[1] for t in tops))

  async def together():
    client = server.async_client()
    calls = [client.completions.create(model=MODEL, prompt=p, max_tokens=n, temperature=0,
                                                    extra_body={"return_token_ids": True})
             for p, n in zip(prompts, lengths)]
    try:
      return await asyncio.gather(*calls)
    finally:
      await client.close()

  batched = [r.choices[0].model_extra["token_ids"] for r in asyncio.run(together())]
  clear = [i for i, gap in enumerate(gaps) if gap > 1e-3]
  assert len(clear) >= 12, gaps
  assert [batched[i] for i in clear] == [solo[i] for i in clear]


def test_prompt_logprobs_equal_full_forward_and_transformers(server, smollm2_hf_dir, shakespeare_dir):
  """lm-evaluation-harness's request (echo, logprobs=1, max_tokens=1) against our forward and transformers'."""
  import jax
  import torch
  import transformers
  from llama_hk import checkpoints
  from llama_hk.models import make_forward

  prompt = " ".join(_shakespeare_prompts(shakespeare_dir, 3))
  r = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, echo=True,
                                       logprobs=1)
  lp = r.choices[0].logprobs
  ckpt = checkpoints.load(smollm2_hf_dir)
  ids = ckpt.tokenizer.encode(prompt)
  assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
  assert r.choices[0].text.startswith(prompt) and lp.text_offset[:3] == [0, len(lp.tokens[0]),
                                                                         len(lp.tokens[0]) + len(lp.tokens[1])]
  served = np.array(lp.token_logprobs[1:])  # Prompt tokens 1.., then the generated one.

  logits, _ = jax.jit(make_forward(ckpt.config).apply)(ckpt.params, np.array([ids]))
  ours = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))  # (T, V)
  expected = ours[np.arange(len(ids) - 1), ids[1:]]
  np.testing.assert_allclose(served[:-1], expected, atol=1e-4, rtol=0)
  generated = int(np.argmax(ours[-1]))
  assert lp.tokens[-1] == ckpt.tokenizer.decode([generated])
  np.testing.assert_allclose(served[-1], ours[-1, generated], atol=1e-4, rtol=0)
  # top_logprobs: the most likely token at each step, with the log-softmax of the step's logits.
  for t, top in enumerate(lp.top_logprobs[1:]):
    [(token, value)] = top.items()
    assert token == ckpt.tokenizer.decode([int(np.argmax(ours[t]))])
    np.testing.assert_allclose(value, ours[t].max(), atol=1e-4, rtol=0)

  model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    reference = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1).numpy()
  np.testing.assert_allclose(served[:-1], reference[np.arange(len(ids) - 1), ids[1:]], atol=1e-4, rtol=0)

  echo_only = server.client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=0)
  assert echo_only.choices[0].text == prompt and echo_only.usage.completion_tokens == 0
  np.testing.assert_allclose(echo_only.choices[0].logprobs.token_logprobs[1:], served[:-1], atol=1e-5, rtol=0)


def test_chat_logprobs_carry_bytes(server):
  r = server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi in Chinese."}],
                                            max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
  content = r.choices[0].logprobs.content
  assert len(content) == r.usage.completion_tokens
  assert b"".join(bytes(c.bytes) for c in content).decode("utf-8", "replace").startswith(r.choices[0].message.content)
  for c in content:
    assert len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob >= c.logprob - 1e-6
    assert c.token.startswith("bytes:") or c.token.encode() == bytes(c.bytes)


def test_cancelled_stream_frees_its_row(server, shakespeare_dir):
  """Four long streams fill the rows; one closed after 5 chunks lets a new request finish while the others run."""
  prompts = _shakespeare_prompts(shakespeare_dir, 40)[-MAX_BATCH:]

  async def scenario():
    client = server.async_client()
    streams = [await client.completions.create(model=MODEL, prompt=prompt, max_tokens=200, temperature=0,
                                               stream=True) for prompt in prompts]
    received = [0] * MAX_BATCH
    finished = [False] * MAX_BATCH

    async def read(i):
      async for chunk in streams[i]:
        received[i] += 1
        finished[i] = finished[i] or chunk.choices[0].finish_reason is not None
        if i == 0 and received[i] == 5:
          await streams[i].close()
          return

    readers = [asyncio.create_task(read(i)) for i in range(MAX_BATCH)]
    await readers[0]
    started = time.monotonic()
    r = await client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
    took = time.monotonic() - started
    others_running = not any(finished[1:])
    for task in readers[1:]:
      task.cancel()
    for stream in streams[1:]:
      await stream.close()
    await client.close()
    return r, took, others_running

  r, took, others_running = asyncio.run(scenario())
  assert r.choices[0].finish_reason == "length" and others_running, (took, others_running)


def test_full_queue_is_503_with_retry_after(server):
  body = json.dumps({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0,
                     "stream": True})
  address = urllib.parse.urlsplit(server.url)
  held, busy = [], None
  try:  # Streams until one is refused: the rows and the queue hold MAX_QUEUE + up to MAX_BATCH of them (fewer
    for _ in range(MAX_BATCH + MAX_QUEUE + 1):  # rows when the previous test's streams are not yet cancelled).
      held.append(http.client.HTTPConnection(address.hostname, address.port, timeout=60))
      held[-1].request("POST", "/v1/completions", body, {"content-type": "application/json"})
      response = held[-1].getresponse()
      if response.status != 200:
        busy = response.status, response.headers["retry-after"], json.loads(response.read())
        break
    assert busy is not None and MAX_QUEUE < len(held) <= MAX_BATCH + MAX_QUEUE + 1
    assert busy[:2] == (503, "1") and busy[2]["error"]["type"] == "service_unavailable"
  finally:
    for connection in held:
      connection.close()
  for _ in range(50):  # The closed streams' sequences are cancelled once the server sees the disconnects.
    try:
      ok = server.client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0)
      break
    except openai.APIStatusError as e:
      assert e.status_code == 503
      time.sleep(0.2)
  assert ok.choices[0].finish_reason == "length"


BAD_REQUESTS = [  # (body or raw text, status, param)
    ('{"model": "smollm2", "prompt": ', 400, None),
    ({"prompt": "x"}, 400, "model"),
    ({"model": "gpt-9", "prompt": "x"}, 404, "model"),
    ({"model": MODEL}, 400, "prompt"),
    ({"model": MODEL, "prompt": 3}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"model": MODEL, "prompt": [[1, 2], [10 ** 9]]}, 400, "prompt"),
    ({"model": MODEL, "prompt": "word " * MAX_SEQ_LEN}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "max_tokens": MAX_SEQ_LEN}, 400, "max_tokens"),
]


def test_bad_requests_get_openai_error_objects(server):
  for body, status, param in BAD_REQUESTS:
    code, _, response = _request(server.url, "POST", "/v1/completions", body if isinstance(body, str)
                                 else json.dumps(body))
    error = response["error"]
    assert code == status and error["param"] == param, (body, code, error)
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
  code, _, response = _request(server.url, "POST", "/v1/chat/completions",
                               json.dumps({"model": MODEL, "messages": "hi"}))
  assert code == 400 and response["error"]["param"] == "messages"
  assert _request(server.url, "GET", "/v1/nothing")[0] == 404
  with pytest.raises(openai.NotFoundError):
    server.client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
  ok = server.client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0)
  assert ok.usage.completion_tokens == 2  # Still serving.


def test_n_samples_with_a_seed_differ_and_reproduce(server):
  def sample():
    r = server.client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=1.0,
                                         top_p=0.95, n=2, seed=1234, extra_body={"top_k": 50})
    return [c.text for c in r.choices]

  first = sample()
  assert len(first) == 2 and first[0] != first[1]
  assert sample() == first


def test_lm_eval_local_completions_equals_the_native_backend(server, smollm2_hf_dir, tmp_path):
  """lm-evaluation-harness's `local-completions` model pointed at the server scores the test tasks (multiple choice,
  rolling, generation) as the native `llama_hk` backend does on the same weights: every request's log-likelihood
  <= 1e-4 apart, is_greedy and generated text equal, and the same acc, acc_norm and exact_match."""
  import lm_eval
  from llama_hk import checkpoints
  from llama_hk.eval import harness

  manager = harness.task_manager(str(eval_tasks.write_tasks(tmp_path / "tasks")), include_defaults=False)
  served = lm_eval.simple_evaluate(
      model="local-completions", tasks=list(eval_tasks.TASKS), task_manager=manager, log_samples=True,
      bootstrap_iters=0, model_args={"model": MODEL, "base_url": f"{server.url}/v1/completions",
                                     "tokenizer_backend": "huggingface", "tokenizer": str(smollm2_hf_dir),
                                     "max_length": MAX_SEQ_LEN, "num_concurrent": 1, "max_retries": 1})
  ckpt = checkpoints.load(smollm2_hf_dir)
  native = harness.evaluate(harness.LlamaHkLM(ckpt.config, ckpt.params, ckpt.tokenizer, batch_size=4,
                                              max_length=MAX_SEQ_LEN),
                            list(eval_tasks.TASKS), manager, log_samples=True)
  for task in eval_tasks.TASKS:
    pairs = list(zip(served["samples"][task], native["samples"][task], strict=True))
    assert pairs
    for a, b in pairs:
      assert a["doc_id"] == b["doc_id"]
      for x, y in zip(a["filtered_resps"], b["filtered_resps"], strict=True):
        eval_tasks.assert_same_response(task, a["doc_id"], x, y)
    for name in {"hk_mc": ("acc,none", "acc_norm,none"), "hk_rolling": (), "hk_gen": ("exact_match,none",)}[task]:
      assert served["results"][task][name] == native["results"][task][name], (task, name)


def test_sigterm_ends_streams_and_exits(server):
  """Last: SIGTERM mid-stream gives the stream a final chunk and [DONE], and the server exits 0 within 10 s."""
  stream = server.client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=200, temperature=0,
                                            stream=True)
  chunks = []
  for chunk in stream:
    chunks.append(chunk)
    if len(chunks) == 3:
      server.process.send_signal(signal.SIGTERM)
      signalled = time.monotonic()
  assert chunks[-1].choices[0].finish_reason is not None and len(chunks) < 200
  assert server.process.wait(timeout=10) == 0 and time.monotonic() - signalled < 10


@pytest.fixture(scope="module")
def tiny_dir(tiny_hf_model, smollm2_hf_dir, tmp_path_factory):
  """A random GQA model (4/2 heads) with SmolLM2's tokenizer, saved by transformers."""
  import shutil

  directory = tmp_path_factory.mktemp("tiny_serve")
  tiny_hf_model(seed=21, vocab_size=49152, weight_std=0.1, max_position_embeddings=64).save_pretrained(directory)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(smollm2_hf_dir / name, directory / name)
  return directory


def _greedy_ids(model, prompt, new_tokens: int = 16) -> list[int]:
  """transformers' greedy continuation of `prompt`, checked to be well defined (top-2 logit gap > 1e-3 at every
  step) and free of end-of-sequence ids."""
  import torch

  with torch.no_grad():
    ids = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False)[0]
    top2 = model(ids[None]).logits[0, len(prompt) - 1:-1].topk(2).values
  assert (top2[:, 0] - top2[:, 1]).min() > 1e-3 and len(ids) == len(prompt) + new_tokens
  return ids[len(prompt):].tolist()


def test_adapter_is_served_merged_as_peft_generates(tiny_dir, tmp_path):
  """--adapter: a peft-written LoRA adapter (B non-zero) on a random model; greedy completions equal peft's
  generate on the same prompt, and differ from the base model's."""
  import peft
  import torch
  import transformers

  base = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="eager")
  torch.manual_seed(0)
  tuned = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM",
                                                    target_modules=["q_proj", "v_proj", "down_proj"])).eval()
  tuned.save_pretrained(tmp_path / "adapter")
  prompt = [1, 504, 3326, 282, 253, 1345, 30]
  expected = _greedy_ids(tuned, prompt)
  with tuned.disable_adapter():
    assert _greedy_ids(tuned, prompt) != expected
  with serving(tiny_dir, f"--adapter={tmp_path / 'adapter'}", "--max_batch=1", "--max_seq_len=64") as s:
    r = s.client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                    extra_body={"return_token_ids": True})
  assert r.choices[0].model_extra["token_ids"] == expected


def test_sharded_server_on_eight_devices_equals_transformers(tiny_dir):
  """--gin_file=gin/sharding/data_fsdp_tensor.gin on 8 simulated devices (data 2 x fsdp 2 x tensor 2): three
  concurrent greedy requests return transformers' greedy ids."""
  import torch
  import transformers

  model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="eager")
  prompts = [[1, 504, 3326, 282, 253, 1345, 30], [17, 9000, 4242], [1, 2500, 31, 77, 12000]]
  expected = [_greedy_ids(model.eval(), p) for p in prompts]

  async def complete(s, prompt):
    async with s.async_client() as client:
      return await client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                             extra_body={"return_token_ids": True})

  async def all_at_once(s):
    return await asyncio.gather(*(complete(s, p) for p in prompts))

  with serving(tiny_dir, "--gin_file=gin/sharding/data_fsdp_tensor.gin", "--max_batch=4", "--max_seq_len=64",
               env=harness.EIGHT_DEVICES) as s:
    responses = asyncio.run(all_at_once(s))
  assert [r.choices[0].model_extra["token_ids"] for r in responses] == expected
