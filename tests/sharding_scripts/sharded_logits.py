"""Run with 8 simulated devices: prints JSON {mesh name: max abs logit difference to one device}."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from llama_hk import checkpoints, sharding  # noqa: E402
from llama_hk.models import llama  # noqa: E402

checkpoint, batch, meshes = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
reference = checkpoints.load(checkpoint)
forward = llama.make_forward(reference.config)
rng = np.random.default_rng(0)
tokens = rng.integers(3, reference.config.vocab_size, size=(batch, 48)).astype(np.int32)
segments = np.ones_like(tokens)
segments[1, 40:] = 0  # Padding in one row.
single, _ = jax.jit(forward.apply)(reference.params, tokens, segment_ids=segments)
out = {}
for name, shape in meshes.items():
  mesh = sharding.make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])
  ckpt = checkpoints.load(checkpoint, mesh=mesh)
  shards = [len({d.id for d in leaf.sharding.addressable_devices}) for leaf in jax.tree.leaves(ckpt.params)]
  with sharding.axis_rules(mesh):
    put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
    logits, _ = jax.jit(forward.apply)(ckpt.params, put(tokens), segment_ids=put(segments))
  diff = np.abs(np.asarray(logits) - np.asarray(single))[segments.astype(bool)]
  out[name] = {"max_abs": float(diff.max()), "max_logit": float(np.abs(np.asarray(single)).max()),
               "devices": max(shards)}
print(json.dumps(out))
