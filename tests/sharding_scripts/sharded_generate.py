"""Run with 8 simulated devices: prints JSON {mesh name: greedy ids, KV cache shard shape, ...}, "one" for one device.

Prompts of different lengths (padded to a batch of 4 rows, one of them padding), no stop at EOS, so every row
decodes max_new_tokens tokens.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from llama_hk import checkpoints, inference, sharding  # noqa: E402
from llama_hk.inference import decode  # noqa: E402

checkpoint, max_new_tokens, meshes = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
TEXTS = ["The three primary colors are", "Once upon a time, in a land far away, there lived a", "def fib(n):"]


def run(mesh):
  ckpt = checkpoints.load(checkpoint, mesh=mesh)
  if ckpt.tokenizer is not None:
    prompts = [ckpt.tokenizer.encode(text) for text in TEXTS]
  else:
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, ckpt.config.vocab_size, size=n).tolist() for n in (5, 13, 2)]
  seen = []  # The cache of each decode call.
  decode_chunk = decode.decode_chunk

  def recording_decode_chunk(params, state, *args, **kwargs):
    seen.append((state.cache.k.shape, state.cache.k.sharding.shard_shape(state.cache.k.shape)))
    return decode_chunk(params, state, *args, **kwargs)

  decode.decode_chunk = recording_decode_chunk
  try:
    generator = inference.Generator(ckpt.config, ckpt.params, ckpt.tokenizer, mesh=mesh)
    completions, _ = generator.generate(prompts, max_new_tokens, use_eos=False)
  finally:
    decode.decode_chunk = decode_chunk
  shards = [len({str(index) for index in leaf.sharding.devices_indices_map(leaf.shape).values()})
            for leaf in jax.tree.leaves(ckpt.params)]
  return {"ids": [c.ids for c in completions], "prompt_lengths": [len(p) for p in prompts],
          "cache_shape": list(seen[0][0]), "cache_shard_shapes": sorted({tuple(s) for _, s in seen}),
          "decode_calls": len(seen), "param_shards": max(shards), "devices": 1 if mesh is None else mesh.size}


out = {"one": run(None)}
for name, shape in meshes.items():
  out[name] = run(sharding.make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))]))
print(json.dumps(out))
