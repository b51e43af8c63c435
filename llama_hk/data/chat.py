"""Chat and instruction data: JSONL conversations, rendered by the tokenizer's chat template, with the loss on the
assistant's tokens only.

A line is `{"messages": [{"role": ..., "content": ...}, ...]}` or `{"prompt": ..., "completion": ...}` (one user
turn and the assistant's reply). A conversation's ids are its rendered template encoded piece by piece: each
assistant message is the text its turn adds to the rendering of the messages before it with the generation prompt
(for ChatML: the reply, `<|im_end|>` and the newline), and those tokens alone are targets, so the model learns to
reply and to end its turn, never to write the user's side. Encoding the prompt apart matches inference, which
encodes the prompt and then appends what it generates.
"""

import glob
import hashlib
import json
import os
from collections.abc import Sequence

import numpy as np

from llama_hk.errors import UserError
from llama_hk.tokenizers.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
SPLITS = ("train", "validation")


def parse_line(line: str, where: str) -> list[dict]:
  """The messages of one JSONL line; UserError naming `where` (file:line) for anything else."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise UserError(f"{where}: invalid JSON ({e.msg})") from None
  if not isinstance(record, dict):
    raise UserError(f"{where}: not a JSON object")
  if "messages" in record:
    messages = record["messages"]
  elif "prompt" in record and "completion" in record:
    messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
  else:
    raise UserError(f"{where}: no \"messages\" (nor \"prompt\" and \"completion\")")
  if not isinstance(messages, list) or not messages:
    raise UserError(f"{where}: \"messages\" must be a non-empty list")
  for k, message in enumerate(messages):
    if not (isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)):
      raise UserError(f"{where}: message {k} needs a role ({', '.join(ROLES)}) and a string content")
  if not any(m["role"] == "assistant" for m in messages):
    raise UserError(f"{where}: no assistant message to train on")
  return messages


def encode(messages: list[dict], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """(ids, assistant) of a conversation: int32 ids of its rendered template and float32 1.0 on each token of an
  assistant message's text (the tokens to predict)."""
  full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
  pieces, done = [], 0  # (text, is assistant)
  for k, message in enumerate(messages):
    if message["role"] != "assistant":
      continue
    start = len(tokenizer.apply_chat_template(messages[:k], add_generation_prompt=True)) if k else 0
    end = len(tokenizer.apply_chat_template(messages[:k + 1], add_generation_prompt=False))
    if not done <= start <= end <= len(full):
      raise UserError(f"{tokenizer.source}: the chat template does not render a conversation as the renderings "
                      "of its prefixes, so its assistant tokens cannot be found")
    pieces += [(full[done:start], False), (full[start:end], True)]
    done = end
  pieces.append((full[done:], False))
  ids, assistant = [], []
  for text, is_assistant in pieces:
    if ids and not text:
      continue
    piece = tokenizer.encode(text, add_bos=False if ids else None, add_eos=False)  # The first piece has BOS.
    ids += piece
    assistant += [float(is_assistant)] * len(piece)
  return np.asarray(ids, np.int32), np.asarray(assistant, np.float32)


class ChatSource(Sequence[str]):
  """One split of JSONL conversation files: each document is one line's JSON text, checked when read here."""

  def __init__(self, lines: list[str], description: str):
    self._lines = lines
    self.description = description

  def __len__(self) -> int:
    return len(self._lines)

  def __getitem__(self, index: int) -> str:
    return self._lines[index]

  def __repr__(self) -> str:
    return f"ChatSource({self.description}, {len(self)} conversations)"


def chat_jsonl(path: str, split: str, validation_percent: int = 5) -> ChatSource:
  """A split of the JSONL file(s) `path` (a file or glob): a line goes to validation when a hash of its file name
  and line number falls in `validation_percent`; every line is checked first, so a bad one fails the run at once."""
  if split not in SPLITS:
    raise UserError(f"chat_jsonl split {split!r}: must be one of {SPLITS}")
  files = sorted(glob.glob(os.path.expanduser(path)))
  if not files:
    raise UserError(f"CHAT_JSONL={path}: no such file")
  lines = []
  for file in files:
    try:
      with open(file, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
          if not line.strip():
            continue
          parse_line(line, f"{file}:{number}")
          bucket = int(hashlib.sha256(f"{os.path.basename(file)}:{number}".encode()).hexdigest(), 16) % 100
          if (bucket < validation_percent) == (split == "validation"):
            lines.append(line)
    except (OSError, UnicodeDecodeError) as e:
      raise UserError(f"{file}: cannot read ({getattr(e, 'strerror', None) or e})") from None
  if not lines:
    raise UserError(f"CHAT_JSONL={path}: no conversation in its {split} split")
  return ChatSource(lines, f"chat_jsonl({path})[{split}]")
