"""Bad input to checkpoints.load, bin/convert and bin/eval: a one-line UserError naming the file and the fault;
from the binaries, one `error: ` line on stderr, exit 1, and nothing written (no output directory, no temporary
sibling, no --output_json)."""

import json
import pathlib
import re
import shutil
import subprocess
import sys
from concurrent import futures

import gguf
import pytest

from llama_hk import checkpoints
from llama_hk import eval as evaluation
from llama_hk.errors import UserError
from harness import assert_one_line_error

REPO = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 288  # Room for the GGUF test tokenizer.


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_hf_model, write_tiny_gguf) -> dict[str, pathlib.Path]:
  """Every bad input, plus the valid ones they are variations of."""
  root = tmp_path_factory.mktemp("cli_inputs")
  model = tiny_hf_model(seed=40, vocab_size=VOCAB)
  good_hf = root / "good_hf"
  model.save_pretrained(good_hf)
  paths = {"good_hf": good_hf, "missing": root / "no_such_checkpoint"}

  not_checkpoint = root / "not_a_checkpoint"
  not_checkpoint.mkdir()
  (not_checkpoint / "notes.txt").write_text("just notes\n")
  paths["not_checkpoint"] = not_checkpoint

  def variant(name, edit_config=None):
    path = root / name
    shutil.copytree(good_hf, path)
    if edit_config:
      config = json.loads((path / "config.json").read_text())
      edit_config(config)
      (path / "config.json").write_text(json.dumps(config))
    return path

  paths["bad_shapes"] = variant("bad_shapes", lambda c: c.update(intermediate_size=128))
  paths["gpt2"] = variant("gpt2", lambda c: c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"]))
  truncated = variant("truncated")
  weights = truncated / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
  paths["truncated"] = truncated

  paths["good_gguf"] = root / "good.gguf"
  write_tiny_gguf(paths["good_gguf"], model)
  paths["gguf_q8_1"] = root / "q8_1.gguf"
  write_tiny_gguf(paths["gguf_q8_1"], model, {"blk.1.ffn_down.weight": gguf.GGMLQuantizationType.Q8_1})
  paths["gguf_i32"] = root / "i32.gguf"
  write_tiny_gguf(paths["gguf_i32"], model, {"blk.0.attn_q.weight": gguf.GGMLQuantizationType.I32})

  text = root / "play.txt"
  text.write_text("FLAVIUS.\nHence! home, you idle creatures, get you home.\nIs this a holiday?\n")
  paths["text"] = text
  paths["empty_text"] = root / "empty.txt"
  paths["empty_text"].write_text("")
  return paths


# case: (input key, which file the message must name, pattern for the fault)
CHECKPOINT_FAULTS = {
    "missing_path": ("missing", "missing", r"no such file or directory"),
    "not_a_checkpoint": ("not_checkpoint", "not_checkpoint", r"not a checkpoint"),
    "shapes_disagree": ("bad_shapes", "bad_shapes", r"tensor model\.layers\.0\.mlp\.\w+_proj\.weight has shape"),
    "not_llama": ("gpt2", "gpt2", r"model_type is 'gpt2'"),
    "truncated_safetensors": ("truncated", "truncated", r"truncated safetensors file"),
    "gguf_q8_1": ("gguf_q8_1", "gguf_q8_1", r"tensor blk\.1\.ffn_down\.weight has unsupported GGUF type Q8_1"),
    "gguf_i32": ("gguf_i32", "gguf_i32", r"tensor blk\.0\.attn_q\.weight has unsupported GGUF type I32"),
}


def _run(binary: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(REPO / "bin" / binary), *args], capture_output=True, text=True,
                        timeout=300)


def _check_error(proc: subprocess.CompletedProcess, names: pathlib.Path, fault: str, outputs: pathlib.Path) -> None:
  assert_one_line_error(proc, str(names))
  assert re.search(fault, proc.stderr), proc.stderr
  assert list(outputs.iterdir()) == []  # No output (directory or --output_json), no temporary sibling.
  assert proc.stdout == ""


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory) -> dict[tuple[str, str], tuple[subprocess.CompletedProcess, pathlib.Path]]:
  """Every failing command, run concurrently once: (binary, case) -> (process, the folder that must stay empty)."""
  commands = {}
  for case, (key, _, _) in CHECKPOINT_FAULTS.items():
    outputs = tmp_path_factory.mktemp(f"convert_{case}")
    commands["convert", case] = (outputs, [f"--input={inputs[key]}", f"--output={outputs / 'converted'}"])
    outputs = tmp_path_factory.mktemp(f"eval_{case}")
    commands["eval", case] = (outputs, [f"--checkpoint={inputs[key]}", f"--text_file={inputs['text']}",
                                        "--max_seq_len=16", f"--output_json={outputs / 'result.json'}"])
  for case, text in (("empty_text", inputs["empty_text"]), ("missing_text", inputs["missing"] / "play.txt")):
    outputs = tmp_path_factory.mktemp(f"eval_{case}")
    commands["eval", case] = (outputs, [f"--checkpoint={inputs['good_gguf']}", f"--text_file={text}",
                                        "--max_seq_len=16", f"--output_json={outputs / 'result.json'}"])
  outputs = tmp_path_factory.mktemp("eval_no_tokenizer")
  commands["eval", "no_tokenizer"] = (outputs, [f"--checkpoint={inputs['good_hf']}", f"--text_file={inputs['text']}",
                                                "--max_seq_len=16", f"--output_json={outputs / 'result.json'}"])
  with futures.ThreadPoolExecutor(max_workers=4) as pool:
    running = {key: (pool.submit(_run, key[0], *args), outputs) for key, (outputs, args) in commands.items()}
    return {key: (future.result(), outputs) for key, (future, outputs) in running.items()}


def _check_message(message: str, names: pathlib.Path, fault: str) -> None:
  assert "\n" not in message, message
  assert str(names) in message, message
  assert re.search(fault, message), message


@pytest.mark.parametrize("case", list(CHECKPOINT_FAULTS))
def test_load_rejects_bad_checkpoint(case, inputs, tmp_path):
  key, names, fault = CHECKPOINT_FAULTS[case]
  with pytest.raises(UserError) as error:
    checkpoints.load(inputs[key], on_device=False)
  _check_message(str(error.value), inputs[names], fault)
  with pytest.raises(UserError) as error:
    checkpoints.convert(inputs[key], tmp_path / "converted")
  _check_message(str(error.value), inputs[names], fault)
  assert list(tmp_path.iterdir()) == []  # Neither the output directory nor a temporary sibling.


@pytest.mark.parametrize("case, names, fault", [
    ("empty_text", "empty_text", r"empty text file"),
    ("missing_text", None, r"no such file"),
    ("no_tokenizer", "good_hf", r"carries no tokenizer"),
])
def test_evaluate_text_rejects_bad_text_or_tokenizer(case, names, fault, inputs):
  checkpoint = inputs["good_hf" if case == "no_tokenizer" else "good_gguf"]
  text = {"empty_text": inputs["empty_text"], "missing_text": inputs["missing"] / "play.txt"}.get(case, inputs["text"])
  with pytest.raises(UserError) as error:
    evaluation.evaluate_text(checkpoint, str(text), max_seq_len=16)
  _check_message(str(error.value), inputs["missing"] / "play.txt" if names is None else inputs[names], fault)


@pytest.mark.slow
@pytest.mark.parametrize("binary", ["convert", "eval"])
@pytest.mark.parametrize("case", list(CHECKPOINT_FAULTS))
def test_binary_rejects_bad_checkpoint(binary, case, inputs, runs):
  key, names, fault = CHECKPOINT_FAULTS[case]
  proc, outputs = runs[binary, case]
  _check_error(proc, inputs[names], fault, outputs)


@pytest.mark.slow
@pytest.mark.parametrize("case, names, fault", [
    ("empty_text", "empty_text", r"empty text file"),
    ("missing_text", None, r"no such file"),
    ("no_tokenizer", "good_hf", r"carries no tokenizer"),
])
def test_eval_rejects_bad_text_or_tokenizer(case, names, fault, inputs, runs):
  proc, outputs = runs["eval", case]
  _check_error(proc, inputs["missing"] / "play.txt" if names is None else inputs[names], fault, outputs)


@pytest.mark.slow
def test_valid_inputs_succeed(inputs, tmp_path):
  """The control: the unbroken GGUF converts, and evaluates to a finite perplexity written to --output_json."""
  converted = tmp_path / "converted"
  proc = _run("convert", f"--input={inputs['good_gguf']}", f"--output={converted}")
  assert proc.returncode == 0, proc.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]
  result = tmp_path / "result.json"
  proc = _run("eval", f"--checkpoint={converted}", f"--text_file={inputs['text']}", "--max_seq_len=16",
              f"--output_json={result}")
  assert proc.returncode == 0, proc.stderr
  values = json.loads(result.read_text())
  assert values["tokens"] > 0 and 1.0 < values["perplexity"] < 10 * VOCAB
