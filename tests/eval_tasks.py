"""The lm-evaluation-harness tasks the tests define: YAML under a temporary include path over local JSONL (no hub),
one of each request kind: multiple choice by log-likelihood (acc, acc_norm), rolling perplexity (word and byte
perplexity, bits per byte) and free generation (exact_match). Used by tests/test_harness.py and tests/test_serve.py.
"""

import json
import os
import pathlib
import textwrap

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # The tasks read only local JSONL.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TASKS = ("hk_mc", "hk_rolling", "hk_gen")

MC_TRAIN = [
    {"question": "The sky on a clear day is", "choices": [" blue", " green", " loud"], "label": 0},
    {"question": "Two and two make", "choices": [" four", " seven", " a horse"], "label": 0},
]
MC_TEST = [
    {"question": "Water freezes into", "choices": [" ice", " fire", " paper", " song"], "label": 0},
    {"question": "A cat says", "choices": [" meow", " moo"], "label": 0},
    {"question": "The opposite of day is", "choices": [" noon", " night", " Tuesday"], "label": 1},
    {"question": "Shakespeare wrote", "choices": [" Hamlet", " the telephone book", " nothing at all"], "label": 0},
    {"question": "Friends, Romans,", "choices": [" countrymen", " lend me your ears"], "label": 0},
    {"question": "Bees make", "choices": [" honey", " steel", " thunder"], "label": 0},
]
ROLLING = [
    {"text": "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him. "
             "The evil that men do lives after them; the good is oft interred with their bones; so let it be "
             "with Caesar. The noble Brutus hath told you Caesar was ambitious: if it were so, it was a "
             "grievous fault, and grievously hath Caesar answer'd it."},
    {"text": "To be, or not to be: that is the question."},
    {"text": "All the world's a stage, and all the men and women merely players: they have their exits and "
             "their entrances; and one man in his time plays many parts, his acts being seven ages."},
]
GEN = [
    {"prompt": "Q: What is the capital of France?\nA:", "answer": " Paris"},
    {"prompt": "Q: Two plus two?\nA:", "answer": " four"},
    {"prompt": "Once upon a time", "answer": " there"},
    {"prompt": "The quick brown fox", "answer": " jumps"},
    {"prompt": "Romeo, Romeo, wherefore art thou", "answer": " Romeo"},
]


def _jsonl(path: pathlib.Path, rows) -> str:
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  return str(path)


def write_tasks(directory: pathlib.Path) -> pathlib.Path:
  """The three test tasks as YAML over local JSONL in `directory`, which becomes an --include_path."""
  directory.mkdir(parents=True, exist_ok=True)
  mc_train, mc_test = _jsonl(directory / "mc_train.jsonl", MC_TRAIN), _jsonl(directory / "mc_test.jsonl", MC_TEST)
  rolling, gen = _jsonl(directory / "rolling.jsonl", ROLLING), _jsonl(directory / "gen.jsonl", GEN)
  (directory / "hk_mc.yaml").write_text(textwrap.dedent(f"""\
      task: hk_mc
      dataset_path: json
      dataset_kwargs:
        data_files: {{train: "{mc_train}", test: "{mc_test}"}}
      training_split: train
      test_split: test
      output_type: multiple_choice
      doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
      doc_to_choice: choices
      doc_to_target: label
      metric_list:
        - metric: acc
        - metric: acc_norm
      """))
  (directory / "hk_rolling.yaml").write_text(textwrap.dedent(f"""\
      task: hk_rolling
      dataset_path: json
      dataset_kwargs:
        data_files: {{test: "{rolling}"}}
      test_split: test
      output_type: loglikelihood_rolling
      doc_to_text: ""
      doc_to_target: "{{{{text}}}}"
      metric_list:
        - metric: word_perplexity
        - metric: byte_perplexity
        - metric: bits_per_byte
      """))
  (directory / "hk_gen.yaml").write_text(textwrap.dedent(f"""\
      task: hk_gen
      dataset_path: json
      dataset_kwargs:
        data_files: {{test: "{gen}"}}
      test_split: test
      output_type: generate_until
      doc_to_text: "{{{{prompt}}}}"
      doc_to_target: "{{{{answer}}}}"
      generation_kwargs:
        until: ["\\n", "."]
        max_gen_toks: 8
        do_sample: false
      metric_list:
        - metric: exact_match
      """))
  return directory


def assert_same_response(task: str, doc_id, x, y) -> None:
  """One request's responses from two backends agree: a choice's log-likelihood within 1e-4 and its is-greedy flag
  equal (hk_mc), a rolling log-likelihood within 1e-4 or 1e-6 relative, whichever is looser (hk_rolling), a
  generated text equal (hk_gen).

  A rolling document sums its tokens' float32 errors: on an AMD EPYC without AVX-512, SmolLM2's ROLLING[0] (81
  tokens, -288.97) is 8e-5 above a float64 model's in the hf backend's float32 model and 1.1e-4 below it in ours on
  a 128-token row (9e-5 above it on an 81-token row: the row length alone moves it by 2e-4)."""
  if task == "hk_mc":
    assert abs(x[0] - y[0]) <= 1e-4 and x[1] == y[1], (task, doc_id, x, y)
  elif task == "hk_rolling":
    assert abs(x - y) <= max(1e-4, 1e-6 * abs(y)), (task, doc_id, x, y)
  else:
    assert x == y, (task, doc_id, x, y)
