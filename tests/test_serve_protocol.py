"""The serving pieces that need no server: per-row sampling, token bytes and strings, and request checking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_hk.inference.sampling import argmax, sample_rows, top_k_threshold
from llama_hk.serving import protocol
from llama_hk.tokenizers.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(smollm2_hf_dir):
  return Tokenizer.from_dir(smollm2_hf_dir)


@pytest.mark.slow  # Compiles sample_rows' bisections three ways.
def test_sample_rows_depend_on_their_own_row_only():
  logits = jax.random.normal(jax.random.key(0), (4, 50)) * 3
  temperature = jnp.array([0.0, 1.0, 0.7, 1.3])
  top_k = jnp.array([0, 1, 5, 0], jnp.int32)
  top_p = jnp.array([1.0, 1.0, 0.9, 0.5])

  @jax.jit
  def draws(seeds):  # Each seed's draw for every row, the rows together (S, 4) and each row alone (S, 4).
    def one(seed):
      keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(seed), r))(jnp.arange(4))
      together = sample_rows(logits, keys, temperature, top_k, top_p)
      alone = [sample_rows(logits[i:i + 1], keys[i:i + 1], temperature[i:i + 1], top_k[i:i + 1],
                           top_p[i:i + 1])[0] for i in range(4)]
      return together, jnp.stack(alone)
    return jax.vmap(one)(seeds)

  together, alone = (np.asarray(a) for a in draws(jnp.arange(300)))
  np.testing.assert_array_equal(together, alone)
  best = np.asarray(argmax(logits))
  assert (together[:, 0] == best[0]).all() and (together[:, 1] == best[1]).all()  # Greedy, and top-k 1.
  top5 = set(np.argsort(-np.asarray(logits[2]))[:5])  # Row 2 draws among its 5 most likely tokens only...
  assert set(together[:, 2]) <= top5 and len(set(together[:, 2])) > 1
  probs = np.asarray(jax.nn.softmax(logits[3] / 1.3))  # ... and row 3 within its top-p 0.5 nucleus.
  order = np.argsort(-probs)
  nucleus = set(order[:np.searchsorted(np.cumsum(probs[order]), 0.5) + 1])
  assert set(together[:, 3]) <= nucleus and len(set(together[:, 3])) > 1


def test_top_k_threshold_is_the_kth_largest():
  probs = jnp.asarray([[0.1, 0.4, 0.3, 0.2], [0.25, 0.25, 0.25, 0.25]], jnp.float32)
  np.testing.assert_array_equal(np.asarray(top_k_threshold(probs, jnp.array([[2], [3]])))[:, 0],
                                np.array([0.3, 0.25], np.float32))


def test_token_bytes_and_strings(tokenizer):
  text = "Hello, world: ☃ naïve 你好\n"
  ids = tokenizer.encode(text, add_bos=False)
  assert b"".join(tokenizer.token_bytes(i) for i in ids) == text.encode()
  strings = [protocol.token_string(tokenizer, i) for i in ids]
  partial = [s for s in strings if s.startswith("bytes:")]
  assert partial and all(len(s) == len("bytes:") + 4 * len(tokenizer.token_bytes(i))
                         for s, i in zip(strings, ids) if s.startswith("bytes:"))
  assert "".join(s for s in strings if not s.startswith("bytes:")) == "".join(
      tokenizer.decode([i]) for i, s in zip(ids, strings) if not s.startswith("bytes:"))
  assert protocol.token_string(tokenizer, tokenizer.eos_id) == tokenizer.decode([tokenizer.eos_id])


def _parse(tokenizer, chat=False, **body):
  return protocol.parse({"model": "m", **body}, chat=chat, tokenizer=tokenizer, served="m", max_seq_len=64,
                        vocab_size=tokenizer.vocab_size)


def test_parse_turns_prompts_and_choices_into_requests(tokenizer):
  parsed = _parse(tokenizer, prompt=["a b", [5, 6]], n=2, seed=3, temperature=0.5, stop="x", logprobs=2,
                  echo=True, max_tokens=0)
  requests = parsed.requests()
  assert [r.prompt for r in requests] == [tuple(tokenizer.encode("a b"))] * 2 + [(5, 6)] * 2
  assert [r.choice for r in requests] == [0, 1, 0, 1] and {r.seed for r in requests} == {3}
  assert all(r.prompt_logprobs and not r.logprobs and r.max_tokens == 0 and r.stop == ("x",) for r in requests)
  chat = _parse(tokenizer, chat=True, messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=2)
  assert chat.top_logprobs == 2 and chat.max_tokens == 64 - len(chat.prompts[0]) and chat.temperature == 1.0


@pytest.mark.parametrize("body, status, param", [
    ({"model": "other", "prompt": "x"}, 404, "model"),
    ({"prompt": [[]]}, 400, "prompt"),
    ({"prompt": [1, "a"]}, 400, "prompt"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "stop": [""]}, 400, "stop"),
    ({"prompt": "x", "top_k": -2}, 400, "top_k"),
    ({"prompt": "x", "temperature": True}, 400, "temperature"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
])
def test_parse_rejects_bad_fields(tokenizer, body, status, param):
  with pytest.raises(protocol.ApiError) as e:
    protocol.parse({"model": "m", **body}, chat=False, tokenizer=tokenizer, served="m", max_seq_len=64,
                   vocab_size=tokenizer.vocab_size)
  assert (e.value.status, e.value.param) == (status, param)
  assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}
