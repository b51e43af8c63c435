"""Training curves: what bin/plot draws is read back from the figure's data (not its pixels), the PNG's size is
checked, and bad metrics files get one line naming the file and line."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from llama_hk.errors import UserError
from llama_hk.train import curves

REPO = pathlib.Path(__file__).resolve().parents[1]


def write_run(model_dir: pathlib.Path, steps: int, scale: float) -> list[dict]:
  """A metrics.jsonl as bin/train writes it: an evaluation at step 0, training records, evaluations every 4."""
  records = [{"step": 0, "eval_loss": 9.0 * scale, "eval_bits_per_byte": 4.0 * scale, "eval_perplexity": 8000.0}]
  for step in range(1, steps + 1):
    records.append({"step": step, "loss": scale * 10.0 / step, "learning_rate": 1e-3 * min(1.0, step / 3),
                    "grad_norm": 1.0, "tokens_per_s": 100.0, "mfu": 0.1})
    if step % 4 == 0:
      records.append({"step": step, "eval_loss": scale * 9.0 / step, "eval_bits_per_byte": scale * 4.0 / step,
                      "eval_perplexity": 10.0})
  model_dir.mkdir(parents=True)
  (model_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  return records


def test_two_runs_are_drawn_overlaid_with_a_legend(tmp_path):
  import matplotlib.image

  first, second = write_run(tmp_path / "a", 8, 1.0), write_run(tmp_path / "b", 12, 0.5)
  output = tmp_path / "out" / "curves.png"
  fig = curves.plot([tmp_path / "a", tmp_path / "b"], output, ["run a", "run b"], dpi=50)
  assert matplotlib.image.imread(output).shape[:2] == (round(4.2 * 50), 15 * 50)
  loss, evaluation, lr = fig.axes
  assert [t.get_text() for t in loss.get_legend().get_texts()] == ["run a", "run b"]
  for ax, key in ((loss, "loss"), (evaluation, "eval_loss"), (lr, "learning_rate")):
    assert [line.get_label() for line in ax.lines] == ["run a", "run b"]
    for line, records in zip(ax.lines, (first, second)):
      expected = [(r["step"], r[key]) for r in records if key in r]
      np.testing.assert_allclose(np.column_stack([line.get_xdata(), line.get_ydata()]), expected, rtol=1e-12)
  assert list(evaluation.lines[0].get_xdata()) == [0, 4, 8] and evaluation.get_xlabel() == "step"
  bits = curves.plot([tmp_path / "a"], tmp_path / "bits.png", eval_metric="eval_bits_per_byte")
  assert list(bits.axes[1].lines[0].get_ydata()) == [4.0, 1.0, 0.5]
  assert bits.axes[0].lines[0].get_label() == str(tmp_path / "a")  # The path, without --label.


def test_bad_metrics_files_name_the_file_and_line(tmp_path):
  missing, empty, broken = tmp_path / "missing", tmp_path / "empty", tmp_path / "broken"
  with pytest.raises(UserError, match=rf"^{missing}/metrics.jsonl: no such file \(is {missing} a training"):
    curves.plot([missing], tmp_path / "x.png")
  empty.mkdir()
  (empty / "metrics.jsonl").write_text("\n")
  with pytest.raises(UserError, match=rf"^{empty}/metrics.jsonl: empty metrics file$"):
    curves.plot([empty], tmp_path / "x.png")
  broken.mkdir()
  (broken / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": \n')
  with pytest.raises(UserError, match=rf"^{broken}/metrics.jsonl:2: not JSON \("):
    curves.plot([broken], tmp_path / "x.png")
  (broken / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n[1, 2]\n')
  with pytest.raises(UserError, match=rf"^{broken}/metrics.jsonl:2: not a metrics record"):
    curves.plot([broken], tmp_path / "x.png")
  with pytest.raises(UserError, match=r"^--label: 2 given for 1 model_dirs$"):
    curves.plot([broken], tmp_path / "x.png", ["a", "b"])
  assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_bin_plot_writes_the_png(tmp_path):
  write_run(tmp_path / "a", 8, 1.0)
  write_run(tmp_path / "b", 8, 0.7)
  output = tmp_path / "curves.png"
  good = subprocess.run([sys.executable, "bin/plot", f"--model_dir={tmp_path / 'a'}", f"--model_dir={tmp_path / 'b'}",
                         f"--output={output}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert good.returncode == 0, good.stderr[-2000:]
  assert good.stdout.strip() == str(output) and output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert output.stat().st_size > 10_000
