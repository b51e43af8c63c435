"""The grain pipeline: determinism, checkpoint restore, sharding, packing, evaluation batches, gin wiring."""

import collections
import importlib
import functools
import itertools
import json
import pathlib

import gin
import numpy as np
import pytest

from llama_hk.data import batch as batch_format
from llama_hk.data import pipeline
from llama_hk.data import sources
from llama_hk.errors import UserError
from llama_hk.tokenizers.tokenizer import Tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
SEQ_LEN = 64


@pytest.fixture(scope="module")
def tokenizer(shakespeare_tokenizer_dir) -> Tokenizer:
  return Tokenizer.from_dir(shakespeare_tokenizer_dir)


@pytest.fixture(scope="module")
def corpus_dir(shakespeare_dir, tmp_path_factory) -> pathlib.Path:
  """25 documents: openings of 24 works, 200 to 3650 characters, and one 20000-character document."""
  root = tmp_path_factory.mktemp("corpus")
  works = sorted(shakespeare_dir.glob("*.txt"))
  for i, path in enumerate(works[:24]):
    (root / path.name).write_text(path.read_text()[:200 + 150 * i])
  (root / "long.txt").write_text(works[30].read_text()[:20_000])
  return root


@pytest.fixture(scope="module")
def corpus(corpus_dir, tmp_path_factory) -> sources.TextSource:
  source = sources.local_corpus(str(corpus_dir), "train", str(tmp_path_factory.mktemp("tfds")), validation_percent=0)
  assert len(source) == 25
  return source


def _chunks_of(source, tokenizer) -> list[list[tuple[int, ...]]]:
  """Each document's expected chunks, computed without the pipeline."""
  result = []
  for text in source:
    ids = tokenizer.encode(text) + [tokenizer.eos_id]
    assert ids[0] == tokenizer.bos_id
    step = SEQ_LEN - 1
    result.append([tuple(ids[s:s + SEQ_LEN]) for s in (range(0, len(ids) - 1, step) if len(ids) > SEQ_LEN else [0])])
  return result


def _segments(batches) -> list[tuple[int, ...]]:
  """The token sequence of every segment of every row, in order."""
  found = []
  for batch in batches:
    for tokens, segment_ids in zip(batch["tokens"], batch["segment_ids"]):
      for segment in range(1, segment_ids.max() + 1):
        found.append(tuple(tokens[segment_ids == segment].tolist()))
  return found


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_equal_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)
      assert x[key].dtype == y[key].dtype


def test_split_document_overlaps_by_one_token():
  tokens = np.arange(11)
  chunks = pipeline.split_document(tokens, 4)
  assert [c.tolist() for c in chunks] == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9], [9, 10]]
  assert [c.tolist() for c in pipeline.split_document(np.arange(4), 4)] == [[0, 1, 2, 3]]
  assert [c.tolist() for c in pipeline.split_document(np.arange(5), 4)] == [[0, 1, 2, 3], [3, 4]]


def test_empty_batch_is_padding_in_the_batch_format():
  empty = batch_format.empty_batch(3, SEQ_LEN)
  assert tuple(empty) == batch_format.BATCH_KEYS
  assert {k: (v.shape, v.dtype.name) for k, v in empty.items()} == {
      key: ((3, SEQ_LEN), "float32" if key == "loss_mask" else "int32") for key in batch_format.BATCH_KEYS}
  assert not any(v.any() for v in empty.values())


def test_batches_have_the_documented_layout(corpus, tokenizer):
  batches = _take(pipeline.make_pipeline(corpus, tokenizer, SEQ_LEN, batch_size=4, seed=0), 20)
  for batch in batches:
    assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
        "tokens": ((4, SEQ_LEN), "int32"), "positions": ((4, SEQ_LEN), "int32"),
        "segment_ids": ((4, SEQ_LEN), "int32"), "targets": ((4, SEQ_LEN), "int32"),
        "loss_mask": ((4, SEQ_LEN), "float32")}
    for tokens, positions, segment_ids, targets, loss_mask in zip(*(batch[k] for k in batch_format.BATCH_KEYS)):
      used = segment_ids != 0
      assert used[:used.sum()].all()  # Padding only at the end.
      ids = segment_ids[used]
      assert ids[0] == 1 and set(np.diff(ids)) <= {0, 1}  # Segments numbered 1, 2, ... in order.
      for segment in range(1, ids.max() + 1):
        np.testing.assert_array_equal(positions[segment_ids == segment], np.arange(np.sum(segment_ids == segment)))
      assert np.all(tokens[~used] == 0) and np.all(positions[~used] == 0)
      valid = np.zeros(SEQ_LEN, bool)
      valid[:-1] = (segment_ids[1:] == segment_ids[:-1]) & used[1:]
      np.testing.assert_array_equal(loss_mask, valid.astype(np.float32))
      np.testing.assert_array_equal(targets[:-1][valid[:-1]], tokens[1:][valid[:-1]])
      assert np.all(targets[~valid] == 0)


def test_same_seed_same_batches_other_seed_other_batches(corpus, tokenizer):
  def run(seed):
    return _take(pipeline.make_pipeline(corpus, tokenizer, SEQ_LEN, batch_size=2, seed=seed), 15)

  _assert_equal_batches(run(7), run(7))
  assert not np.array_equal(run(7)[0]["tokens"], run(8)[0]["tokens"])


def test_restored_state_continues_bit_identically_across_epochs(corpus, tokenizer):
  epoch_tokens = sum(len(tokenizer.encode(text)) + 1 for text in corpus)
  batches_per_epoch = epoch_tokens // (SEQ_LEN * 2)
  checkpoints = [1, batches_per_epoch - 1, batches_per_epoch + 2, 2 * batches_per_epoch + 1]
  total = checkpoints[-1] + 4

  def make():
    return pipeline.make_pipeline(corpus, tokenizer, SEQ_LEN, batch_size=2, seed=3, num_packing_bins=4)

  iterator = make()
  batches, states = [], {}
  for step in range(total):
    if step in checkpoints:
      states[step] = json.dumps(iterator.get_state())  # States are plain data, as checkpoints store them.
    batches.append(next(iterator))
  chunks_per_epoch = sum(len(document) for document in _chunks_of(corpus, tokenizer))
  assert len(_segments(batches)) > chunks_per_epoch, "the run should cross an epoch boundary"
  for step in checkpoints:
    restored = make()
    restored.set_state(json.loads(states[step]))
    _assert_equal_batches(_take(restored, 4), batches[step:step + 4])


def test_each_epoch_is_a_new_permutation_of_the_documents(corpus, tokenizer):
  chunks = _chunks_of(corpus, tokenizer)
  document_of = {chunk: index for index, document in enumerate(chunks) for chunk in document}
  # One packing bin keeps the documents' order in the rows.
  iterator = pipeline.make_pipeline(corpus, tokenizer, SEQ_LEN, batch_size=1, seed=5, num_epochs=2,
                                    num_packing_bins=1)
  order = [document_of[segment] for segment in _segments(iterator)]
  order = [d for i, d in enumerate(order) if i == 0 or d != order[i - 1]]  # A long document's chunks are adjacent.
  first, second = order[:25], order[25:]
  assert sorted(first) == sorted(second) == list(range(25))
  assert first != second


@pytest.mark.parametrize("process_count", [1, 3])
def test_shards_are_disjoint_and_cover_every_chunk_once(corpus, tokenizer, process_count):
  chunks = _chunks_of(corpus, tokenizer)
  shards = []
  for process_index in range(process_count):
    iterator = pipeline.make_pipeline(corpus, tokenizer, SEQ_LEN, batch_size=process_count, seed=1, num_epochs=1,
                                      process_index=process_index, process_count=process_count)
    shards.append(collections.Counter(_segments(iterator)))
  documents = [{i for i, document in enumerate(chunks) if any(c in shard for c in document)} for shard in shards]
  assert sum(len(d) for d in documents) == 25 and set().union(*documents) == set(range(25))
  # Nothing lost or duplicated: each document's chunks arrive exactly once, in its own shard.
  assert sum(shards, collections.Counter()) == collections.Counter(c for document in chunks for c in document)


def test_batch_size_is_global(corpus, tokenizer):
  batch = next(pipeline.make_pipeline(corpus, tokenizer, SEQ_LEN, batch_size=6, process_index=2, process_count=3))
  assert batch["tokens"].shape == (2, SEQ_LEN)


def test_fixed_num_shards_gives_the_same_global_batches_on_any_process_count(corpus, tokenizer):
  def global_batches(make, process_count, count):
    """The first `count` global batches; a process that has run out gives empty rows, as the trainer pads."""
    per_process = [list(itertools.islice(make(process_index=i, process_count=process_count), count))
                   for i in range(process_count)]
    empty = {key: np.zeros_like(value) for key, value in per_process[0][0].items()}
    return [{key: np.concatenate([batches[n][key] if n < len(batches) else empty[key] for batches in per_process])
             for key in batch_format.BATCH_KEYS} for n in range(count)]

  train = lambda **kwargs: pipeline.make_pipeline(corpus, tokenizer, SEQ_LEN, batch_size=8, seed=2, **kwargs)
  one = global_batches(functools.partial(train, num_shards=4), 1, 6)
  _assert_equal_batches(global_batches(functools.partial(train, num_shards=4), 2, 6), one)
  _assert_equal_batches(global_batches(functools.partial(train, num_shards=4), 4, 6), one)
  assert not np.array_equal(global_batches(train, 1, 1)[0]["tokens"], one[0]["tokens"])  # Shards choose the rows.
  evaluation = lambda **kwargs: pipeline.eval_batches(corpus, tokenizer, SEQ_LEN, batch_size=8, num_shards=4, **kwargs)
  count = len(list(evaluation(process_index=0, process_count=1)))
  _assert_equal_batches(global_batches(evaluation, 2, count), global_batches(evaluation, 1, count))
  with pytest.raises(UserError, match="num_shards=3 must be a positive multiple of process_count=2 that divides"):
    pipeline.make_pipeline(corpus, tokenizer, SEQ_LEN, batch_size=6, num_shards=3, process_index=0, process_count=2)


def test_bad_arguments_are_user_errors(corpus, tokenizer):
  with pytest.raises(UserError, match="batch_size=4 must be a positive multiple of process_count=3"):
    pipeline.make_pipeline(corpus, tokenizer, SEQ_LEN, batch_size=4, process_index=0, process_count=3)
  with pytest.raises(UserError, match=r"process_index=3 is not in \[0, process_count=3\)"):
    pipeline.make_pipeline(corpus, tokenizer, SEQ_LEN, batch_size=3, process_index=3, process_count=3)
  with pytest.raises(UserError, match="seq_len=1 must be at least 2"):
    pipeline.make_pipeline(corpus, tokenizer, 1, batch_size=1)


def test_eval_batches_cover_the_split_once_in_order(corpus, tokenizer):
  chunks = _chunks_of(corpus, tokenizer)
  batches = list(pipeline.eval_batches(corpus, tokenizer, SEQ_LEN, batch_size=8))
  assert all(b["tokens"].shape == (8, SEQ_LEN) for b in batches)
  assert collections.Counter(_segments(batches)) == collections.Counter(c for d in chunks for c in d)
  assert sum(b["loss_mask"].sum() for b in batches) == sum(len(c) - 1 for d in chunks for c in d)
  assert np.all(batches[-1]["segment_ids"][-1] == 0)  # The padded tail.
  _assert_equal_batches(batches, list(pipeline.eval_batches(corpus, tokenizer, SEQ_LEN, batch_size=8)))


def test_packed_row_loss_equals_documents_one_by_one(corpus, tokenizer):
  model = importlib.import_module("llama_hk.models.llama")
  import jax
  import jax.numpy as jnp
  from llama_hk.config import LlamaConfig

  config = LlamaConfig(vocab_size=tokenizer.vocab_size, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=8, d_ff=64)
  forward = model.make_forward(config)
  rows = (row for batch in pipeline.make_pipeline(corpus, tokenizer, SEQ_LEN, batch_size=2, seed=0)
          for row in zip(*(batch[k] for k in batch_format.BATCH_KEYS)))
  tokens, positions, segment_ids, targets, loss_mask = next(row for row in rows if row[2].max() >= 3)
  # Row 0 is the packed row; row s holds segment s alone at the start (then padding, which it cannot see).
  num_segments = segment_ids.max()
  rows = {k: np.zeros((1 + num_segments, SEQ_LEN), np.int32) for k in ("tokens", "positions", "segment_ids")}
  rows["tokens"][0], rows["positions"][0], rows["segment_ids"][0] = tokens, positions, segment_ids
  for segment in range(1, num_segments + 1):
    length = np.sum(segment_ids == segment)
    rows["tokens"][segment, :length] = tokens[segment_ids == segment]
    rows["positions"][segment, :length] = np.arange(length)
    rows["segment_ids"][segment, :length] = 1
  # Random parameters of the model's shapes: the equality holds for any, and tracing is quicker than init.
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(forward.init, jax.random.PRNGKey(0), jnp.asarray(rows["tokens"]))
  params = jax.tree.map(lambda x: rng.normal(0, 0.5, x.shape).astype(x.dtype), shapes)
  logits, _ = jax.jit(forward.apply)(params, jnp.asarray(rows["tokens"]), positions=jnp.asarray(rows["positions"]),
                                     segment_ids=jnp.asarray(rows["segment_ids"]))
  log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1))  # (1 + S, T, V)
  packed = -log_probs[0, np.arange(SEQ_LEN), targets]
  for segment in range(1, num_segments + 1):
    where = segment_ids == segment
    length = np.sum(where)
    alone = -log_probs[segment, np.arange(length), targets[where]]
    mask = loss_mask[where] == 1
    assert mask.sum() == length - 1
    np.testing.assert_allclose(packed[where][mask], alone[mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("gin_file", ["shakespeare", "local_corpus", "tfds"])
def test_gin_files_wire_both_pipelines(gin_file, shakespeare_data_dir, shakespeare_dir, shakespeare_tokenizer_dir,
                                       corpus_dir, tmp_path):
  bindings = [f"TOKENIZER_DIR = '{shakespeare_tokenizer_dir}'", "SEQ_LEN = 32", "BATCH_SIZE = 2"]
  if gin_file == "shakespeare":
    bindings += [f"DATA_DIR = '{shakespeare_data_dir}'", f"SHAKESPEARE_SOURCE_DIR = '{shakespeare_dir}'"]
    evaluated = sources.shakespeare("validation", str(shakespeare_data_dir), str(shakespeare_dir))
  elif gin_file == "local_corpus":
    bindings += [f"DATA_DIR = '{tmp_path}'", f"CORPUS = '{corpus_dir}'", "VALIDATION_PERCENT = 20"]
    evaluated = sources.local_corpus(str(corpus_dir), "validation", str(tmp_path), validation_percent=20)
  else:  # A dataset prepared earlier, read by name.
    bindings += [f"DATA_DIR = '{shakespeare_data_dir}'", "TFDS_NAME = 'shakespeare'", "EVAL_SPLIT = 'validation'"]
    evaluated = sources.tfds_source("shakespeare", "validation", str(shakespeare_data_dir))
  with gin.unlock_config():
    gin.parse_config_files_and_bindings([str(REPO / "gin" / "data" / f"{gin_file}.gin")], bindings,
                                        finalize_config=False)
  tokenizer = Tokenizer.from_dir(shakespeare_tokenizer_dir)  # The data layer leaves it to the caller, as train() does.
  try:
    batch = next(gin.get_configurable(pipeline.make_pipeline)(tokenizer=tokenizer))
    assert batch["tokens"].shape == (2, 32)
    loss_tokens = sum(b["loss_mask"].sum() for b in gin.get_configurable(pipeline.eval_batches)(tokenizer=tokenizer))
  finally:
    gin.clear_config()
  # Every next-token pair of the evaluated documents is a target once: BOS + text + EOS, less one, each.
  assert 0 < len(evaluated) and loss_tokens == sum(len(tokenizer.encode(text)) for text in evaluated)


@pytest.mark.slow
def test_a_10_mb_single_line_document_is_chunked(tokenizer, tmp_path):
  line = ("Now is the winter of our discontent " * 280_000)[:10_000_000]
  (tmp_path / "long.txt").write_text(line)
  source = sources.local_corpus(str(tmp_path / "long.txt"), "train", str(tmp_path / "tfds"), validation_percent=0)
  # One epoch, so that reading ahead does not tokenize the document again for the next.
  iterator = pipeline.make_pipeline(source, tokenizer, SEQ_LEN, batch_size=4, num_epochs=1, num_packing_bins=4)
  batches = _take(iterator, 3)
  for batch in batches:
    assert np.all(batch["segment_ids"] == 1) and np.all(batch["loss_mask"][:, :-1] == 1)
  # The first 4 chunks fill the first 4 bins, emitted in shuffled order.
  first = batches[0]["tokens"][np.argmax(batches[0]["tokens"][:, 0] == tokenizer.bos_id)]
  assert np.sum(batches[0]["tokens"][:, 0] == tokenizer.bos_id) == 1
  assert tokenizer.decode(first[1:]).startswith("Now is the winter of our discontent")
