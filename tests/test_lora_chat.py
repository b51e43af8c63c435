"""Chat JSONL data: the loss mask covers exactly the assistant's tokens of the rendered chat template (checked
against transformers' rendering and tokenization), and a few steps on a few dozen conversations lower the held-out
loss of others like them."""

import json

import jax
import numpy as np
import pytest
import transformers

from llama_hk import config as config_lib
from llama_hk import train
from llama_hk.data import chat, pipeline
from llama_hk.errors import UserError
from llama_hk.tokenizers.tokenizer import Tokenizer

CONVERSATION = [{"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": "Who wrote Hamlet?"},
                {"role": "assistant", "content": "Shakespeare."},
                {"role": "user", "content": "And when?"},
                {"role": "assistant", "content": "Around 1600, in London."}]


@pytest.fixture(scope="module")
def tokenizer(smollm2_hf_dir) -> Tokenizer:
  return Tokenizer.from_dir(smollm2_hf_dir)


def _spans(ids, mask) -> list[list[int]]:
  """The runs of ids where mask is 1."""
  spans, current = [], None
  for i, m in zip(ids, mask):
    if m and current is None:
      current = []
      spans.append(current)
    if not m:
      current = None
    else:
      current.append(int(i))
  return spans


def test_mask_covers_exactly_the_assistant_tokens(tokenizer, smollm2_hf_dir):
  ids, assistant = chat.encode(CONVERSATION, tokenizer)
  hf = transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir)
  rendered = hf.apply_chat_template(CONVERSATION, tokenize=False)
  assert ids.tolist() == hf(rendered, add_special_tokens=False)["input_ids"]
  replies = [hf.decode(span) for span in _spans(ids, assistant)]
  assert replies == ["Shakespeare.<|im_end|>\n", "Around 1600, in London.<|im_end|>\n"]
  prompt_side = hf.decode([i for i, m in zip(ids, assistant) if not m])
  assert "Shakespeare" not in prompt_side and "Who wrote Hamlet?" in prompt_side

  row = pipeline.add_targets({"tokens": ids, "tokens_segment_ids": np.ones_like(ids),
                              "tokens_positions": np.arange(len(ids)), "weights": assistant})
  scored = row["targets"][row["loss_mask"] > 0]
  assert scored.tolist() == [i for i, m in zip(ids[1:], assistant[1:]) if m]


def _conversations(count: int, seed: int) -> list[str]:
  """Question-and-answer pairs of one pattern: the answer repeats the question's word."""
  rng = np.random.default_rng(seed)
  words = ["apple", "river", "stone", "crown", "sword", "cloud", "storm", "night"]
  lines = []
  for _ in range(count):
    word = words[rng.integers(len(words))]
    lines.append(json.dumps({"prompt": f"Say {word}.", "completion": f"{word} {word} {word}."}))
  return lines


@pytest.mark.slow
def test_fine_tuning_on_conversations_lowers_held_out_loss(tokenizer):
  config = config_lib.LlamaConfig(vocab_size=tokenizer.vocab_size, d_model=32, num_layers=1, num_heads=2,
                                  num_kv_heads=1, d_ff=64, max_seq_len=64, tie_embeddings=True)
  train_source = chat.ChatSource(_conversations(36, 0), "train")
  held_out = chat.ChatSource(_conversations(8, 1), "held out")
  optimizer = train.make_optimizer(total_steps=12, peak_learning_rate=2e-2, schedule="constant", weight_decay=0.0)
  state = train.init_state(config, optimizer)
  step = jax.jit(train.make_train_step(config, optimizer))
  evaluate = jax.jit(train.make_eval_step(config))

  def held_out_loss(params):
    batches = pipeline.eval_batches(held_out, tokenizer, seq_len=64, batch_size=4, process_index=0,
                                    process_count=1, document_format="chat")
    totals = np.array([evaluate(params, batch) for batch in batches]).sum(axis=0)
    return totals[0] / totals[1]

  before = held_out_loss(state.params)
  batches = pipeline.make_pipeline(train_source, tokenizer, seq_len=64, batch_size=4, process_index=0,
                                   process_count=1, document_format="chat")
  try:
    for _ in range(12):
      state, _ = step(state, next(batches))
  finally:
    batches.close()
  after = held_out_loss(state.params)
  assert after < 0.7 * before, (before, after)


def test_chat_jsonl_line_without_messages(tmp_path):
  path = tmp_path / "chats.jsonl"
  path.write_text(json.dumps({"messages": CONVERSATION}) + "\n" + json.dumps({"text": "hello"}) + "\n")
  with pytest.raises(UserError, match=f'^{path}:2: no "messages" \\(nor "prompt" and "completion"\\)$'):
    chat.chat_jsonl(str(path), "train")
