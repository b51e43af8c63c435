"""The OpenAI wire format: request bodies checked and turned into engine Requests, Outputs turned into responses.

A bad field is an `ApiError` carrying OpenAI's error object and status. Token strings (in `logprobs`) are each
token decoded alone; a token that is not whole characters by itself (a byte of a multi-byte character) is
written `bytes:` followed by its bytes as `\\xNN`, as OpenAI does.
"""

import dataclasses
import os
import time
import uuid

from llama_hk.inference.chat import template_ids
from llama_hk.inference.detokenize import IncrementalDetokenizer
from llama_hk.serving.engine import MAX_TOP_LOGPROBS, Output, Request, TokenLogprob
from llama_hk.tokenizers.tokenizer import Tokenizer

MAX_CHOICES = 16  # Largest `n`.
MAX_STOPS = 4  # OpenAI's limit on stop strings.
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions.


class ApiError(Exception):
  """An HTTP error with OpenAI's error object."""

  def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
               code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> ApiError:
  return ApiError(400, message, param)


_MISSING = object()


def _field(body: dict, name: str, kinds: tuple, default=_MISSING):
  """body[name] if it is one of `kinds` (bool is not a number here), else a 400 naming it; None means absent."""
  value = body.get(name)
  if value is None:
    if default is _MISSING:
      raise bad(f"'{name}' is required", name)
    return default
  if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
    names = " or ".join(k.__name__ for k in kinds)
    raise bad(f"'{name}' must be {names}, got {type(value).__name__}", name)
  return value


@dataclasses.dataclass
class Parsed:
  """A checked request: its prompts' ids and what every choice samples."""
  chat: bool
  model: str
  prompts: list[list[int]]
  n: int
  max_tokens: int
  temperature: float
  top_p: float
  top_k: int
  seed: int
  stop: tuple[str, ...]
  stream: bool
  include_usage: bool
  top_logprobs: int | None  # None: no logprobs; else how many alternatives per token.
  echo: bool
  token_ids: bool  # Extension (vLLM's `return_token_ids`): each choice also lists its generated ids.

  def requests(self) -> list[Request]:
    """One engine Request per choice: prompt-major, n samples each, sample j of a seed drawn with choice j."""
    logprobs = self.top_logprobs is not None
    return [Request(tuple(p), self.max_tokens, self.temperature, self.top_k, self.top_p, self.seed, j, self.stop,
                    logprobs and self.max_tokens > 0, logprobs and self.echo)
            for p in self.prompts for j in range(self.n)]


def _model(body: dict, served: str) -> str:
  model = _field(body, "model", (str,))
  if model != served:
    raise ApiError(404, f"the model '{model}' does not exist (this server serves '{served}')", "model",
                   code="model_not_found")
  return model


def _prompts(body: dict, tokenizer: Tokenizer, vocab_size: int) -> list[list[int]]:
  """`prompt` as a string, a list of strings, a list of ids or a list of id lists."""
  prompt = _field(body, "prompt", (str, list))
  if isinstance(prompt, str):
    prompt = [prompt]
  elif prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
    prompt = [prompt]
  if not prompt:
    raise bad("'prompt' is empty", "prompt")
  prompts = []
  for item in prompt:
    if isinstance(item, str):
      ids = tokenizer.encode(item) if item else []
    elif isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
      ids = item
      if any(not 0 <= t < vocab_size for t in ids):
        raise bad(f"'prompt' has token ids outside [0, {vocab_size})", "prompt")
    else:
      raise bad("'prompt' must be a string, a list of strings, a list of token ids or a list of token-id lists",
                "prompt")
    if not ids:
      raise bad("'prompt' has an empty prompt", "prompt")
    prompts.append(list(ids))
  return prompts


def _messages(body: dict, tokenizer: Tokenizer) -> list[int]:
  messages = _field(body, "messages", (list,))
  if not messages:
    raise bad("'messages' is empty", "messages")
  plain = []
  for message in messages:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
      raise bad("each message must be an object with a 'role' string", "messages")
    content = message.get("content", "")
    if isinstance(content, list):  # Content parts: only text ones.
      if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
        raise bad("message content parts must be of type 'text'", "messages")
      content = "".join(str(p.get("text", "")) for p in content)
    if not isinstance(content, str):
      raise bad("message 'content' must be a string or a list of text parts", "messages")
    plain.append({"role": message["role"], "content": content})
  return template_ids(tokenizer, plain)


def _stop(body: dict) -> tuple[str, ...]:
  stop = _field(body, "stop", (str, list), [])
  stop = [stop] if isinstance(stop, str) else stop
  if len(stop) > MAX_STOPS or any(not isinstance(s, str) or not s for s in stop):
    raise bad(f"'stop' must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
  return tuple(stop)


def parse(body, *, chat: bool, tokenizer: Tokenizer, served: str, max_seq_len: int, vocab_size: int) -> Parsed:
  """A /v1/completions (chat False) or /v1/chat/completions body, checked."""
  if not isinstance(body, dict):
    raise bad("the request body must be a JSON object")
  model = _model(body, served)
  prompts = [_messages(body, tokenizer)] if chat else _prompts(body, tokenizer, vocab_size)
  longest = max(len(p) for p in prompts)
  if longest >= max_seq_len:
    raise bad(f"the prompt has {longest} tokens: the context is {max_seq_len}", "messages" if chat else "prompt")
  echo = False if chat else _field(body, "echo", (bool,), False)
  default_tokens = max_seq_len - longest if chat else DEFAULT_COMPLETION_TOKENS
  max_tokens = _field(body, "max_completion_tokens", (int,), None) if chat else None
  max_tokens = _field(body, "max_tokens", (int,), default_tokens) if max_tokens is None else max_tokens
  if max_tokens < 0 or (max_tokens == 0 and not echo):
    raise bad(f"'max_tokens' is {max_tokens}: must be at least 1 (0 only with echo)", "max_tokens")
  if longest + max_tokens > max_seq_len:
    raise bad(f"the prompt has {longest} tokens: with max_tokens={max_tokens} that exceeds the context of "
              f"{max_seq_len} tokens", "max_tokens")
  temperature = float(_field(body, "temperature", (int, float), 1.0))
  if not temperature >= 0:
    raise bad(f"'temperature' is {temperature}: must be >= 0", "temperature")
  top_p = float(_field(body, "top_p", (int, float), 1.0))
  if not 0 < top_p <= 1:
    raise bad(f"'top_p' is {top_p}: must be in (0, 1]", "top_p")
  top_k = _field(body, "top_k", (int,), 0)
  if top_k < 0 and top_k != -1:  # vLLM's -1 also means every token.
    raise bad(f"'top_k' is {top_k}: must be >= 0 (0 or -1 keeps every token)", "top_k")
  n = _field(body, "n", (int,), 1)
  if not 1 <= n <= MAX_CHOICES:
    raise bad(f"'n' is {n}: must be in [1, {MAX_CHOICES}]", "n")
  seed = _field(body, "seed", (int,), None)
  seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
  stream = _field(body, "stream", (bool,), False)
  options = _field(body, "stream_options", (dict,), {})
  include_usage = stream and _field(options, "include_usage", (bool,), False)
  if chat:
    top_logprobs = _field(body, "top_logprobs", (int,), 0)
    top_logprobs = top_logprobs if _field(body, "logprobs", (bool,), False) else None
  else:
    top_logprobs = _field(body, "logprobs", (int,), None)
  if top_logprobs is not None and not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
    raise bad(f"top log-probabilities: {top_logprobs} must be in [0, {MAX_TOP_LOGPROBS}]",
              "top_logprobs" if chat else "logprobs")
  return Parsed(chat, model, prompts, n, max_tokens, temperature, top_p, max(top_k, 0), seed % 2**31, _stop(body),
                stream, include_usage, top_logprobs, echo, _field(body, "return_token_ids", (bool,), False))


def token_string(tokenizer: Tokenizer, token: int) -> str:
  """The token decoded alone, or `bytes:\\xNN...` when its bytes are not whole characters."""
  data = tokenizer.token_bytes(token)
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError:
    return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


class Choice:
  """One choice as its Outputs arrive: the text, ids and log-probabilities so far, and the wire format of each."""

  def __init__(self, index: int, parsed: Parsed, prompt: list[int], tokenizer: Tokenizer):
    self.index, self.parsed, self.prompt, self.tokenizer = index, parsed, prompt, tokenizer
    self.text, self.ids, self.finish_reason, self.error = "", [], None, None
    self.entries: list = []  # Per-token logprob entries in this endpoint's format.
    self._offsets = IncrementalDetokenizer(tokenizer)  # Character offsets of tokens (completions' text_offset).
    self.prompt_text = tokenizer.decode(prompt) if parsed.echo else ""
    self._first = True

  def add(self, output: Output) -> dict:
    """Takes an Output; returns this choice's streaming delta (text, logprobs entries, finish_reason)."""
    entries = []
    if output.prompt_logprobs is not None:
      entries += self._entries(self.prompt, [None, *output.prompt_logprobs])
    if output.logprobs is not None:
      entries += self._entries(output.ids, output.logprobs)
    text = output.text
    if self._first:
      text, self._first = self.prompt_text + text, False
    self.text += text
    self.ids += output.ids
    self.entries += entries
    self.finish_reason = output.finish_reason
    self.error = output.error
    return {"text": text, "entries": entries, "finish_reason": output.finish_reason}

  def _entries(self, ids: list[int], logprobs: list[TokenLogprob | None]) -> list:
    top = self.parsed.top_logprobs
    entries = []
    for token, lp in zip(ids, logprobs):
      offset = len(self._offsets.text)
      self._offsets.push(token)
      string = token_string(self.tokenizer, token)
      alternatives = [] if lp is None else lp.top[:top]
      if self.parsed.chat:
        entries.append({"token": string, "logprob": lp.logprob, "bytes": list(self.tokenizer.token_bytes(token)),
                        "top_logprobs": [{"token": token_string(self.tokenizer, t), "logprob": v,
                                          "bytes": list(self.tokenizer.token_bytes(t))} for t, v in alternatives]})
      else:
        entries.append((string, None if lp is None else lp.logprob,
                        None if lp is None else {token_string(self.tokenizer, t): v for t, v in alternatives},
                        offset))
    return entries

  def logprobs(self, entries: list) -> dict | None:
    if self.parsed.top_logprobs is None:
      return None
    if self.parsed.chat:
      return {"content": entries}
    tokens, token_logprobs, top, offsets = (list(c) for c in zip(*entries)) if entries else ([], [], [], [])
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

  def body(self) -> dict:
    """The non-streamed choice."""
    extra = {"token_ids": self.ids} if self.parsed.token_ids else {}
    if self.parsed.chat:
      return {"index": self.index, "message": {"role": "assistant", "content": self.text},
              "logprobs": self.logprobs(self.entries), "finish_reason": self.finish_reason, **extra}
    return {"index": self.index, "text": self.text, "logprobs": self.logprobs(self.entries),
            "finish_reason": self.finish_reason, **extra}

  def chunk(self, delta: dict) -> dict:
    """A streamed choice delta."""
    if self.parsed.chat:
      return {"index": self.index, "delta": {"content": delta["text"]}, "logprobs": self.logprobs(delta["entries"]),
              "finish_reason": delta["finish_reason"]}
    return {"index": self.index, "text": delta["text"], "logprobs": self.logprobs(delta["entries"]),
            "finish_reason": delta["finish_reason"]}


class Response:
  """Every choice of one request and the envelope around them."""

  def __init__(self, parsed: Parsed, tokenizer: Tokenizer):
    self.parsed = parsed
    self.id = ("chatcmpl-" if parsed.chat else "cmpl-") + uuid.uuid4().hex
    self.created = int(time.time())
    self.choices = [Choice(i, parsed, prompt, tokenizer)
                    for i, prompt in enumerate(p for p in parsed.prompts for _ in range(parsed.n))]

  @property
  def done(self) -> bool:
    return all(c.finish_reason is not None for c in self.choices)

  def usage(self) -> dict:
    prompt = sum(len(p) for p in self.parsed.prompts)
    completion = sum(len(c.ids) for c in self.choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

  def _envelope(self, chunk: bool) -> dict:
    kind = ("chat.completion" if self.parsed.chat else "text_completion") + (".chunk" if chunk and self.parsed.chat
                                                                            else "")
    return {"id": self.id, "object": kind, "created": self.created, "model": self.parsed.model}

  def body(self) -> dict:
    return {**self._envelope(False), "choices": [c.body() for c in self.choices], "usage": self.usage()}

  def chunk(self, choices: list[dict], usage: bool = False) -> dict:
    body = {**self._envelope(True), "choices": choices}
    if self.parsed.include_usage:
      body["usage"] = self.usage() if usage else None
    return body

  def first_chunks(self) -> list[dict]:
    """What a chat stream sends before any token: each choice's assistant role."""
    if not self.parsed.chat:
      return []
    return [self.chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None} for c in self.choices])]
