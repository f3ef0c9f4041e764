"""One process of the multi-host test (tests/test_multihost.py): a context-parallel train step.

``python _multihost_worker.py OUT single`` runs on 8 local CPU devices; ``... OUT multi PID PORT``
joins a 2-process ``jax.distributed`` runtime on localhost (4 CPU devices each, gloo collectives).
Both run two train steps of the same model (one TTT layer: ring attention and the cross-device
fast-weight scan, the collectives that cross processes) on the same global batches over the mesh
``data=2, context=4`` and write the losses and per-parameter sums of squares to ``OUT`` (process 0).
"""

import json
import os
import sys

out, mode = sys.argv[1], sys.argv[2]
os.environ["JAX_PLATFORMS"] = "cpu"
# The test's other XLA flags (conftest's fast CPU compilation) are kept.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count="
                           + ("8" if mode == "single" else "4"))

import jax  # noqa: E402

if mode == "multi":
    pid, port = int(sys.argv[3]), int(sys.argv[4])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ttt_jax.config import load_config  # noqa: E402
from ttt_jax import sharding  # noqa: E402
from ttt_jax.train.trainer import train_program  # noqa: E402

cfg = load_config(None, [
    "model.vocab_size=64", "model.d_model=32", "model.n_layers=1", "model.n_heads=4", "model.n_kv_heads=2",
    "model.d_ff=64", "model.max_seq_len=64", "model.compute_dtype=float32", "model.ttt.layers=[0]",
    "model.ttt.chunk_size=8", "data.seq_len=64", "mesh.data=2", "mesh.context=4",
    "train.learning_rate=1e-2", "train.warmup_steps=1"])
assert jax.device_count() == 8, jax.devices()
mesh = sharding.make_mesh(cfg.mesh)
prog = train_program(cfg, mesh)
rng = np.random.default_rng(0)
losses = []
with jax.set_mesh(mesh):
    model_state, opt_state = prog.init()
    for step in range(2):
        b, t = 4, cfg.data.seq_len
        tokens = rng.integers(0, cfg.model.vocab_size, (b, t + 1)).astype(np.int32)
        seg = np.repeat(np.arange(1, 5, dtype=np.int32), t // 4)[None].repeat(b, 0)   # 4 documents per row
        pos = np.tile(np.arange(t // 4, dtype=np.int32), 4)[None].repeat(b, 0)
        host = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((b, t), np.float32),
                "segment_ids": seg, "positions": pos}
        # Every process holds the same global batch and supplies the rows of its own devices.
        batch = {k: jax.make_array_from_callback(v.shape, prog.batch_sh, lambda idx, v=v: v[idx])
                 for k, v in host.items()}
        model_state, opt_state, metrics = prog.step(model_state, opt_state, batch)
        losses.append(float(metrics["loss"]))
    sums = jax.jit(lambda s: jax.tree.map(lambda x: jnp.sum(jnp.square(x.astype(jnp.float32))), s),
                   out_shardings=sharding.replicated(mesh))(model_state)
    flat = {jax.tree_util.keystr(p): float(v) for p, v in jax.tree_util.tree_flatten_with_path(sums)[0]}
if jax.process_index() == 0:
    with open(out, "w") as f:
        json.dump({"losses": losses, "param_sq_sums": flat, "process_count": jax.process_count()}, f)
