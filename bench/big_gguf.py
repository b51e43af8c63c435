"""An 8B GGUF on a 24 GiB machine: a synthetic file of Llama-3-8B's shapes in Q4_K evaluated and generated from with
`--weights=int8` and `--weights=bfloat16`, with each run's peak RSS beside the loaded weights' size.

The file is written here through the `gguf` package's writer (random Q4_K blocks with small finite scales, F32
norms, SmolLM2's BPE vocabulary padded with unused pieces to 128,256 tokens; about 4.9 GB), so no download is
needed; the weights are random, so perplexity and text mean nothing: the figures are memory and speed. Each run is
`bin/eval --text_file` and `bin/generate` under /usr/bin/time, so peak RSS is the whole process's.

  python bench/big_gguf.py [--layers=32] [--weights=int8,bfloat16] [--dir=/tmp/llama_hk_big] [--keep]
"""

import argparse
import json
import pathlib
import re
import shutil
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
VOCAB, D, F, HEADS, KV_HEADS, HEAD_DIM = 128256, 4096, 14336, 32, 8, 128  # Llama-3-8B.



def _q4_k_blocks(rng, rows: int, cols: int) -> np.ndarray:
  """Random Q4_K bytes for a (rows, cols) matrix: 144-byte blocks of 256 values, d and dmin small finite fp16."""
  blocks = rng.integers(0, 256, size=(rows * cols // 256, 144), dtype=np.uint8)
  scales = np.stack([rng.uniform(2e-4, 1e-3, len(blocks)), rng.uniform(0, 2e-4, len(blocks))], 1)  # d, dmin
  blocks[:, :4] = scales.astype(np.float16).view(np.uint8).reshape(-1, 4)
  return blocks.reshape(rows, cols // 256 * 144)


def write_gguf(path: pathlib.Path, layers: int, seed: int = 0) -> None:
  import gguf

  smollm = gguf.GGUFReader(SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
  field = lambda key: smollm.fields[key].contents()  # noqa: E731
  tokens = field("tokenizer.ggml.tokens")
  types = field("tokenizer.ggml.token_type")
  tokens += [f"[PAD{i}]" for i in range(len(tokens), VOCAB)]
  types += [5] * (VOCAB - len(types))
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_block_count(layers)
  writer.add_context_length(8192)
  writer.add_embedding_length(D)
  writer.add_feed_forward_length(F)
  writer.add_head_count(HEADS)
  writer.add_head_count_kv(KV_HEADS)
  writer.add_rope_freq_base(500000.0)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_vocab_size(VOCAB)
  writer.add_rope_dimension_count(HEAD_DIM)
  writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("smollm")
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  writer.add_token_merges(field("tokenizer.ggml.merges"))
  writer.add_bos_token_id(field("tokenizer.ggml.bos_token_id"))
  writer.add_eos_token_id(field("tokenizer.ggml.eos_token_id"))
  shapes = {"token_embd.weight": (VOCAB, D), "output_norm.weight": (D,), "output.weight": (VOCAB, D)}
  for i in range(layers):
    shapes.update({f"blk.{i}.attn_norm.weight": (D,), f"blk.{i}.ffn_norm.weight": (D,),
                   f"blk.{i}.attn_q.weight": (HEADS * HEAD_DIM, D), f"blk.{i}.attn_k.weight": (KV_HEADS * HEAD_DIM, D),
                   f"blk.{i}.attn_v.weight": (KV_HEADS * HEAD_DIM, D), f"blk.{i}.attn_output.weight": (D, D),
                   f"blk.{i}.ffn_gate.weight": (F, D), f"blk.{i}.ffn_up.weight": (F, D),
                   f"blk.{i}.ffn_down.weight": (D, F)})
  for name, shape in shapes.items():
    if len(shape) == 1:
      writer.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4)
    else:
      writer.add_tensor_info(name, (shape[0], shape[1] // 256 * 144), np.dtype(np.uint8), shape[0] * shape[1] // 256 * 144,
                             raw_dtype=gguf.GGMLQuantizationType.Q4_K)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_ti_data_to_file()
  rng = np.random.default_rng(seed)
  for name, shape in shapes.items():
    writer.write_tensor_data(np.ones(shape, np.float32) if len(shape) == 1 else _q4_k_blocks(rng, *shape))
  writer.close()


def timed_run(args: list[str]) -> tuple[subprocess.CompletedProcess, float, float]:
  """(result, wall seconds, peak RSS in GiB) of a binary under /usr/bin/time -v."""
  start = time.perf_counter()
  result = subprocess.run(["/usr/bin/time", "-v", sys.executable, *args], cwd=REPO, capture_output=True, text=True)
  wall = time.perf_counter() - start
  if result.returncode:
    sys.exit(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")
  rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
  return result, wall, rss_kb / 2**20


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--layers", type=int, default=32)
  parser.add_argument("--weights", default="int8,bfloat16")
  parser.add_argument("--dir", type=pathlib.Path, default=pathlib.Path("/tmp/llama_hk_big"))
  parser.add_argument("--keep", action="store_true", help="keep the GGUF file for another run")
  parser.add_argument("--new_tokens", type=int, default=40, help="past the first 32-step decode call, for a steady figure")
  args = parser.parse_args()

  sys.path.insert(0, str(REPO))
  from llama_hk import checkpoints, config as config_lib

  args.dir.mkdir(parents=True, exist_ok=True)
  path = args.dir / f"llama3_8b_shapes_q4_k_{args.layers}l.gguf"
  if not path.exists():
    start = time.perf_counter()
    write_gguf(path, args.layers)
    print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - start:.0f} s", flush=True)
  config = checkpoints.load_config(path)
  params = config_lib.num_params(config)
  text = args.dir / "lear.txt"
  text.write_text((SHARED / "data" / "shakespeare" / "lear.txt").read_text()[:2000])
  rows = []
  for weights in args.weights.split(","):
    size = params * {"int8": 1, "bfloat16": 2, "float32": 4}[weights] / 2**30
    eval_run, eval_wall, eval_rss = timed_run(["bin/eval", f"--checkpoint={path}", f"--weights={weights}",
                                               f"--text_file={text}", "--max_seq_len=128"])
    out = args.dir / f"generate_{weights}.json"
    _, gen_wall, gen_rss = timed_run(["bin/generate", f"--checkpoint={path}", f"--weights={weights}",
                                      "--prompt=To be, or not to be:", f"--max_new_tokens={args.new_tokens}",
                                      "--temperature=0", f"--output_json={out}"])
    stats = json.loads(out.read_text())["stats"]
    evaluated = json.loads(eval_run.stdout.strip().splitlines()[-1])
    rows.append((weights, size, eval_rss, eval_wall, evaluated["tokens"], gen_rss, gen_wall,
                 stats["decode_tokens_per_s"]))
    print(f"{weights}: weights {size:.2f} GiB; bin/eval peak RSS {eval_rss:.2f} GiB ({eval_rss / size:.2f}x), "
          f"{eval_wall:.0f} s for {evaluated['tokens']} tokens; bin/generate peak RSS {gen_rss:.2f} GiB "
          f"({gen_rss / size:.2f}x), {gen_wall:.0f} s, decode {stats['decode_tokens_per_s']} tokens/s", flush=True)
  print(f"\n{describe()}; {params:,} parameters ({args.layers} layers)")
  print("| weights | loaded size | bin/eval peak RSS | bin/generate peak RSS | decode tokens/s |")
  print("|---|---:|---:|---:|---:|")
  for weights, size, eval_rss, _, _, gen_rss, _, speed in rows:
    print(f"| {weights} | {size:.2f} GiB | {eval_rss:.2f} GiB ({eval_rss / size:.2f}×) | {gen_rss:.2f} GiB "
          f"({gen_rss / size:.2f}×) | {speed} |")
  if not args.keep:
    shutil.rmtree(args.dir)


if __name__ == "__main__":
  main()
