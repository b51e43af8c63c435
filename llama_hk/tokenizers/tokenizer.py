"""One tokenizer interface over sentencepiece (`tokenizer.model`) and Hugging Face `tokenizer.json`.

A tokenizer is defined by its files, which travel inside every llama_hk checkpoint: `tokenizer.model` and/or
`tokenizer.json`, plus `tokenizer_config.json` (special tokens, whether BOS/EOS are added, the chat template,
which transformers may also keep in `chat_template.jinja`). Encoding matches
`transformers.AutoTokenizer.from_pretrained(dir)(text).input_ids`.
"""

import functools
import json
import os
import pathlib

from llama_hk.errors import UserError

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "generation_config.json")


def _token_text(token) -> str | None:
  """Special tokens are written either as strings or as AddedToken dicts."""
  if isinstance(token, dict):
    return token.get("content")
  return token


class Tokenizer:
  """Text <-> ids, special ids, and the chat template, from a tokenizer's files."""

  def __init__(self, files: dict[str, bytes], source: str = "tokenizer"):
    self.files = dict(files)
    self.source = source
    self.config = json.loads(files.get("tokenizer_config.json", b"{}") or b"{}")
    generation = json.loads(files.get("generation_config.json", b"{}") or b"{}")
    if "tokenizer.json" in files:
      import tokenizers
      self._hf = tokenizers.Tokenizer.from_str(files["tokenizer.json"].decode())
      self._spm = None
      self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
    elif "tokenizer.model" in files:
      import sentencepiece
      self._spm = sentencepiece.SentencePieceProcessor(model_proto=files["tokenizer.model"])
      self._hf = None
      self.vocab_size = self._spm.get_piece_size()
    else:
      raise UserError(f"{source}: no tokenizer.model or tokenizer.json")
    self.bos_id = self._special_id("bos_token")
    self.eos_id = self._special_id("eos_token")
    self.pad_id = self._special_id("pad_token")
    self.unk_id = self._special_id("unk_token")
    if self._spm is not None:
      self.bos_id = self.bos_id if self.bos_id is not None else _none_if_negative(self._spm.bos_id())
      self.eos_id = self.eos_id if self.eos_id is not None else _none_if_negative(self._spm.eos_id())
    eos = generation.get("eos_token_id")
    extra = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    self.eos_ids = tuple(dict.fromkeys([i for i in [self.eos_id, *extra] if i is not None]))
    self.add_bos, self.add_eos = self._default_special_tokens()
    template = files.get("chat_template.jinja")
    self.chat_template = template.decode() if template else self.config.get("chat_template")

  @classmethod
  def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
    path = pathlib.Path(path)
    files = {name: (path / name).read_bytes() for name in TOKENIZER_FILES if (path / name).is_file()}
    return cls(files, source=str(path))

  @classmethod
  def in_dir(cls, path: str | os.PathLike) -> "Tokenizer | None":
    """The tokenizer whose files are in `path` (a checkpoint directory), or None when it has none."""
    path = pathlib.Path(path)
    has_vocabulary = (path / "tokenizer.model").is_file() or (path / "tokenizer.json").is_file()
    return cls.from_dir(path) if has_vocabulary else None

  def save(self, path: str | os.PathLike) -> None:
    for name, data in self.files.items():
      pathlib.Path(path, name).write_bytes(data)

  def _special_id(self, key: str) -> int | None:
    text = _token_text(self.config.get(key))
    if text is None:
      return None
    if self._hf is not None:
      return self._hf.token_to_id(text)
    piece = self._spm.piece_to_id(text)
    return None if piece == self._spm.unk_id() and text != self._spm.id_to_piece(piece) else piece

  def _default_special_tokens(self) -> tuple[bool, bool]:
    """Whether encode adds BOS / EOS by default: the config's flags, else what tokenizer.json's post-processor does."""
    if self._hf is not None and ("add_bos_token" not in self.config or "add_eos_token" not in self.config):
      probe = self._hf.encode("a", add_special_tokens=True).ids
      plain = self._hf.encode("a", add_special_tokens=False).ids
      adds_bos = len(probe) > len(plain) and probe[0] == self.bos_id
      adds_eos = len(probe) > len(plain) and probe[-1] == self.eos_id
    else:
      adds_bos, adds_eos = True, False  # sentencepiece LLaMA tokenizers.
    return bool(self.config.get("add_bos_token", adds_bos)), bool(self.config.get("add_eos_token", adds_eos))

  def encode(self, text: str, add_bos: bool | None = None, add_eos: bool | None = None) -> list[int]:
    """Ids of `text`; add_bos/add_eos default to what the tokenizer does by default."""
    if self._hf is not None:
      ids = self._hf.encode(text, add_special_tokens=False).ids
    else:
      ids = self._spm.encode(text)
    add_bos = self.add_bos if add_bos is None else add_bos
    add_eos = self.add_eos if add_eos is None else add_eos
    if add_bos and self.bos_id is not None:
      ids = [self.bos_id] + ids
    if add_eos and self.eos_id is not None:
      ids = ids + [self.eos_id]
    return ids

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    ids = [int(i) for i in ids]
    if self._hf is not None:
      return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
    if skip_special_tokens:
      ids = [i for i in ids if not self._spm.is_control(i)]
    return self._spm.decode(ids)

  def token_bytes(self, token: int) -> bytes:
    """The bytes one token stands for: a byte-level BPE piece through its byte alphabet, a `<0xNN>` byte-fallback
    piece as that byte, any other piece as UTF-8 with SentencePiece's word boundary as a space."""
    token = int(token)
    piece = self._hf.id_to_token(token) if self._hf is not None else self._spm.id_to_piece(token)
    if self._hf is not None and self._byte_level and token not in self._added_ids:
      alphabet = _byte_alphabet()
      return bytes(alphabet[c] for c in piece)
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
      return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode()

  @functools.cached_property
  def _byte_level(self) -> bool:
    return json.loads(self.files["tokenizer.json"]).get("decoder", {}).get("type") == "ByteLevel"

  @functools.cached_property
  def _added_ids(self) -> frozenset[int]:
    return frozenset(self._hf.get_added_tokens_decoder())

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Renders the tokenizer's chat template as transformers does (sandboxed jinja2, trimmed blocks)."""
    if not self.chat_template:
      raise UserError(f"{self.source}: the tokenizer has no chat template")
    import jinja2.sandbox

    def raise_exception(message):
      raise UserError(f"{self.source}: chat template: {message}")

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, indent=indent, ensure_ascii=False)
    return env.from_string(self.chat_template).render(
        messages=messages, add_generation_prompt=add_generation_prompt,
        bos_token=_token_text(self.config.get("bos_token")) or "",
        eos_token=_token_text(self.config.get("eos_token")) or "")


def _none_if_negative(i: int) -> int | None:
  return None if i < 0 else i


@functools.cache
def _byte_alphabet() -> dict[str, int]:
  """Byte-level BPE's printable stand-in for each byte (GPT-2's): printable Latin-1 bytes stand for themselves,
  the others take the characters from U+0100 on, in byte order."""
  printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
  others = [b for b in range(256) if b not in printable]
  return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}
