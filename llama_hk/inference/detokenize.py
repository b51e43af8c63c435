"""Incremental detokenization of one generated row, with its stop strings and the part safe to print so far."""

from collections.abc import Sequence

from llama_hk.tokenizers.tokenizer import Tokenizer

_INCOMPLETE = "\ufffd"  # What decoding yields for a byte sequence that is not yet a whole character.


class IncrementalDetokenizer:
  """One row's text, decoded token by token, cut at the first stop string.

  Decoding from a recent offset (as transformers' and vLLM's streamers do) keeps the work linear, keeps
  SentencePiece's word-initial spaces, and holds back a byte sequence that is not yet a whole character.
  `printable` hands the text out in pieces that never contain a stop string, nor a beginning of one that the
  next token could complete.
  """

  def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str] = ()):
    self.tokenizer = tokenizer
    self.stop_strings = tuple(stop_strings)
    self.ids: list[int] = []
    self.text = ""  # Decoded so far, cut before a stop string.
    self.stopped = False  # The text reached a stop string.
    self._prefix_offset = 0
    self._read_offset = 0
    self._emitted = 0

  def push(self, token: int) -> None:
    """Adds one token; sets `stopped` when the text now contains a stop string (cut off there)."""
    self.ids.append(token)
    prefix = self.tokenizer.decode(self.ids[self._prefix_offset:self._read_offset])
    full = self.tokenizer.decode(self.ids[self._prefix_offset:])
    if len(full) <= len(prefix) or full.endswith(_INCOMPLETE):
      return
    searched_from = len(self.text)
    self.text += full[len(prefix):]
    self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
    for stop in self.stop_strings:
      at = self.text.find(stop, max(0, searched_from - len(stop) + 1))
      if at >= 0:
        self.text = self.text[:at]
        self.stopped = True

  def finish(self) -> None:
    """Decodes what push held back: the row has ended, so a partial character is as whole as it gets."""
    if not self.stopped and self._read_offset < len(self.ids):
      prefix = self.tokenizer.decode(self.ids[self._prefix_offset:self._read_offset])
      self.text += self.tokenizer.decode(self.ids[self._prefix_offset:])[len(prefix):]
      self._read_offset = len(self.ids)

  def printable(self, final: bool) -> str:
    """Text not yet handed out, less (unless final) a tail that could still become a stop string."""
    end = len(self.text)
    if not final:
      for stop in self.stop_strings:
        for n in range(min(len(stop) - 1, len(self.text)), 0, -1):
          if self.text.endswith(stop[:n]):
            end = min(end, len(self.text) - n)
            break
    out = self.text[self._emitted:end]
    self._emitted = max(self._emitted, end)
    return out
