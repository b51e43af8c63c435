"""Training curves as a picture: loss, evaluation loss (or bits per byte) and learning rate against steps, read
from runs' metrics.jsonl and drawn with matplotlib (headless, its Agg canvas; imported only when drawing).

One row of three panels; every run is one line in each, labelled by its model_dir (or the label given), so that
runs overlaid compare at a glance.
"""

import json
import os
import pathlib

from llama_hk import io_utils
from llama_hk.errors import UserError
from llama_hk.train.metrics import METRICS_FILE

EVAL_METRICS = ("eval_loss", "eval_bits_per_byte", "eval_perplexity")  # What the middle panel may show.
CURVES_FILE = "curves.png"


def read_metrics(model_dir: str | os.PathLike) -> list[dict]:
  """The records of model_dir/metrics.jsonl; UserError naming the file (and line) when it is missing, empty or
  not JSON."""
  path = pathlib.Path(model_dir) / METRICS_FILE
  try:
    lines = path.read_text().splitlines()
  except FileNotFoundError:
    raise UserError(f"{path}: no such file (is {model_dir} a training model_dir?)") from None
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f"{path}:{number}: not JSON ({e.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
      raise UserError(f"{path}:{number}: not a metrics record (an object with an integer \"step\")")
    records.append(record)
  if not records:
    raise UserError(f"{path}: empty metrics file")
  return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of the records holding `key`, in step order."""
  points = sorted((r["step"], float(r[key])) for r in records if r.get(key) is not None)
  return [s for s, _ in points], [v for _, v in points]


def figure(runs: dict[str, list[dict]], eval_metric: str = "eval_loss"):
  """A matplotlib Figure of the runs (label -> records): loss, `eval_metric` and learning rate against step."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  if eval_metric not in EVAL_METRICS:
    raise UserError(f"--eval_metric={eval_metric}: must be one of {', '.join(EVAL_METRICS)}")
  panels = (("training loss", "loss"), ("evaluation " + eval_metric[len("eval_"):].replace("_", " "), eval_metric),
            ("learning rate", "learning_rate"))
  fig = Figure(figsize=(15, 4.2), layout="constrained")
  FigureCanvasAgg(fig)
  for ax, (title, key) in zip(fig.subplots(1, len(panels)), panels):
    for label, records in runs.items():
      steps, values = series(records, key)
      ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=label)
    ax.set(title=title, xlabel="step", ylabel=key)
    ax.grid(alpha=0.3)
    if key == "learning_rate":
      ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
  fig.axes[0].legend(fontsize="small")
  return fig


def plot(model_dirs: list[str | os.PathLike], output: str | os.PathLike, labels: list[str] | None = None,
         eval_metric: str = "eval_loss", dpi: int = 100):
  """Draws the runs of `model_dirs` (labelled by `labels`, default their paths) into the PNG `output`, written
  atomically; returns the Figure."""
  if not model_dirs:
    raise UserError("--model_dir: give at least one training model_dir")
  labels = [str(d) for d in model_dirs] if labels is None else list(labels)
  if len(labels) != len(model_dirs):
    raise UserError(f"--label: {len(labels)} given for {len(model_dirs)} model_dirs")
  fig = figure({label: read_metrics(d) for label, d in zip(labels, model_dirs)}, eval_metric)
  with io_utils.atomic_file(output) as tmp:
    fig.savefig(tmp, format="png", dpi=dpi)
  return fig
