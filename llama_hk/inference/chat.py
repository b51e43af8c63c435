"""Text in and out of a Generator: prompt files, chat-template turns, the interactive chat and the JSON results."""

import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import TextIO

from llama_hk import io_utils
from llama_hk.errors import UserError
from llama_hk.inference.generator import Completion, GenerationStats, Generator
from llama_hk.tokenizers.tokenizer import Tokenizer

Record = tuple[str, Completion]  # A prompt's text (or a chat turn) and its completion.


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


def template_ids(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
  """The ids of `messages` rendered by the tokenizer's chat template, ready for the assistant's reply."""
  rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
  return tokenizer.encode(rendered, add_bos=False, add_eos=False)  # The template writes its own specials.


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
    return template_ids(self.tokenizer, self.messages)

  def add_reply(self, text: str) -> None:
    self.messages.append({"role": "assistant", "content": text})


def _write(stream: TextIO | None, text: str) -> None:
  if stream is not None:
    stream.write(text)
    stream.flush()


def _streamer(stdout: TextIO | None):
  """An on_tokens callback that writes each row's new text to stdout as it comes."""
  return lambda row, ids, text: _write(stdout, text)


def _tokenizer(generator: Generator) -> Tokenizer:
  if generator.tokenizer is None:
    raise UserError("text prompts need a tokenizer, and the checkpoint has none")
  return generator.tokenizer


def run_prompts(generator: Generator, texts: Sequence[str], stdout: TextIO | None, stats_out: TextIO | None, *,
                chat: bool = False, **options) -> tuple[list[Record], GenerationStats]:
  """Completes text prompts (each a chat user turn with `chat`): one prompt streams to stdout, then a newline;
  several print when all are done, each followed by a blank line. The statistics line goes to stats_out.

  `options` are Generator.generate's (max_new_tokens, sampling, seed, stop_strings, ...); a None stream writes
  nothing (the processes of a multi-host run other than the first).
  """
  tokenizer = _tokenizer(generator)
  prompts = [prompt_ids(tokenizer, text, chat) for text in texts]
  streaming = len(prompts) == 1
  completions, stats = generator.generate(prompts, on_tokens=_streamer(stdout) if streaming else None, **options)
  for completion in completions:
    _write(stdout, "\n" if streaming else completion.text + "\n\n")
  _write(stats_out, stats.summary() + "\n")
  return list(zip(texts, completions)), stats


def run_chat(generator: Generator, stdin: Iterable[str], stdout: TextIO | None, stats_out: TextIO | None = None,
             **options) -> tuple[list[Record], GenerationStats]:
  """A chat on stdin, one user turn a line (blank lines skipped), that keeps the conversation.

  Each reply streams to stdout, then a newline; each turn's statistics line goes to stats_out. Returns the
  (turn, reply) records and the statistics summed over turns. `options` and None streams as in `run_prompts`.
  """
  conversation = Chat(_tokenizer(generator))
  records, stats = [], GenerationStats()
  for line in stdin:
    turn = line.rstrip("\n")
    if not turn.strip():
      continue
    [completion], turn_stats = generator.generate([conversation.prompt_ids(turn)], on_tokens=_streamer(stdout),
                                                  **options)
    _write(stdout, "\n")
    conversation.add_reply(completion.text)
    records.append((turn, completion))
    stats.merge(turn_stats)
    _write(stats_out, turn_stats.summary() + "\n")
  return records, stats


def write_results(path: str | os.PathLike, records: Sequence[Record], stats: GenerationStats) -> None:
  """The JSON results file: {"results": [{prompt, completion, ids, finish_reason}], "stats": {...}}, atomically."""
  results = [{"prompt": text, "completion": c.text, "ids": c.ids, "finish_reason": c.finish_reason}
             for text, c in records]
  io_utils.write_json_atomic(path, {"results": results, "stats": stats.as_dict()})
