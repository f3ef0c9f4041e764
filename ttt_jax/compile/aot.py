"""Ahead-of-time compilation of the real train step for a TPU slice, from any host.

:func:`compile_train` builds the config's mesh over a TPU topology's devices
(:func:`topology_devices`; no TPU needed: libtpu's compiler runs on the CPU host), builds the train
step ``ttt-jax train`` runs (:func:`ttt_jax.train.trainer.train_program`: same model, optimizer,
shardings and donation), lowers it with ``jax.ShapeDtypeStruct`` arguments and compiles it. The
trace runs under ``jax.set_mesh(mesh)``, so every automatic kernel choice sees the TPU target
(:mod:`ttt_jax.platform`) and picks what a live run on that slice picks.

:func:`analyse` turns the executable into a :class:`Report`: per-chip memory against HBM, model
FLOPs (:mod:`ttt_jax.models.flops`), collective bytes over ICI and DCN and the Mosaic kernels
(:mod:`ttt_jax.compile.hlo`), and a roofline step-time estimate from :mod:`ttt_jax.compile.chips`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ttt_jax import platform as platform_lib
from ttt_jax.compile import hlo
from ttt_jax.compile.chips import GIB, Topology
from ttt_jax.config import Config
from ttt_jax.models.flops import flops_per_token

FIT_FRACTION = 0.9   # planning rule: the peak estimate may use at most 90% of a chip's HBM
BATCH_FIELDS = {"inputs": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32,
                "segment_ids": jnp.int32, "positions": jnp.int32}


def topology_devices(topo: Topology) -> list:
    """The devices of ``topo`` (``TpuDevice`` descriptions, no hardware needed)."""
    from jax.experimental import topologies

    # libtpu takes a machine-wide lock file when it loads, meant to keep two processes off one TPU;
    # a compile touches no chip, so several compiles (or a compile beside a run) may load it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs = {"num_slices": topo.num_slices} if topo.num_slices > 1 else {}
    # libtpu's start-up warnings (TPU_ACCELERATOR_TYPE, ...) do not apply to a compile-only host;
    # what was written is replayed if loading fails.
    with platform_lib.captured_stderr():
        desc = topologies.get_topology_desc(topology_name=topo.topology_name, platform="tpu", **kwargs)
    return list(desc.devices)


def build_mesh(cfg: Config, devices: list, num_slices: int = 1) -> Mesh:
    """The config's ``(data, fsdp, tensor, context)`` mesh over ``devices``. Multi-slice: ``data``
    spans the slices (its gradient all-reduce is the only traffic over DCN); it must be a multiple
    of ``num_slices``."""
    from ttt_jax.parallel import mesh as parallel_mesh
    from ttt_jax import sharding

    if num_slices == 1:
        return sharding.make_mesh(cfg.mesh, devices=devices)
    m = cfg.mesh
    sizes = parallel_mesh.resolve_axis_sizes(
        dict(zip(parallel_mesh.MESH_AXES, (m.data, m.fsdp, m.tensor, m.context))), len(devices))
    if sizes["data"] % num_slices:
        raise ValueError(f"mesh.data={sizes['data']} must be a multiple of --num-slices={num_slices} "
                         "(data parallelism spans the slices over DCN)")
    from jax.experimental import mesh_utils
    ici = (sizes["data"] // num_slices, sizes["fsdp"], sizes["tensor"], sizes["context"])
    arr = mesh_utils.create_hybrid_device_mesh(ici, (num_slices, 1, 1, 1), devices=devices)
    auto = jax.sharding.AxisType.Auto
    return Mesh(arr, parallel_mesh.MESH_AXES, axis_types=(auto,) * 4)


def processes_of(devices: list) -> int:
    return len({d.process_index for d in devices})


@dataclasses.dataclass
class Compiled:
    what: str
    compiled: Any
    compile_s: float
    global_batch: int
    seq_len: int


def compile_train(cfg: Config, mesh: Mesh, processes: int) -> Compiled:
    """AOT-compile ``ttt-jax train``'s step of ``cfg`` on ``mesh``; ``processes`` hosts each feed
    ``data.batch_size`` rows (so the global batch is their product, as in a live run)."""
    from ttt_jax import sharding
    from ttt_jax.train.trainer import check_batch_divisible, train_program

    cfg.validate()
    ttt_on = bool(cfg.model.ttt.layer_ids(cfg.model.n_layers))
    sharding.check_supported(mesh, cfg.data.seq_len, cfg.model.ttt.chunk_size if ttt_on else None,
                             cfg.runtime.context.layout)
    global_batch = cfg.data.batch_size * processes
    check_batch_divisible(global_batch, mesh)
    prog = train_program(cfg, mesh)
    abs_model, abs_opt = jax.eval_shape(prog.init)
    batch = {k: jax.ShapeDtypeStruct((global_batch, cfg.data.seq_len), dt) for k, dt in BATCH_FIELDS.items()}
    t0 = time.perf_counter()
    try:
        with jax.set_mesh(mesh), platform_lib.target(platform_lib.mesh_platform(mesh)):
            compiled = prog.step.lower(abs_model, abs_opt, batch).compile()
    except jax.errors.JaxRuntimeError as e:
        m = re.search(r"RESOURCE_EXHAUSTED: .*?temporaries \(([\d.]+)([KMGT])\)", str(e))
        if m is None:
            raise
        temp = int(float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024)
        args = sum(_shard_bytes(x) for x in jax.tree.leaves((abs_model, abs_opt)))
        raise DoesNotFit(str(e).splitlines()[0], temp, args, time.perf_counter() - t0) from None
    return Compiled("train", compiled, time.perf_counter() - t0, global_batch, cfg.data.seq_len)


def compile_generate(cfg: Config, mesh: Mesh, processes: int, *, prompt_len: int,
                     prefill_block: int = 1024) -> list[Compiled]:
    """AOT-compile the inference engine's prefill step (one ``prefill_block`` of prompt tokens) and
    its one-token decode step (:mod:`ttt_jax.infer.engine`), over a KV cache for ``prompt_len``
    tokens. ``data.batch_size`` sequences per host; the batch and the cache's batch dimension are
    split over ``data`` x ``fsdp``; parameters are placed as in training. ``mesh.context`` must be 1
    (cached inference does not split a sequence over devices)."""
    import dataclasses as dc

    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from ttt_jax.infer.cache import init_cache
    from ttt_jax.infer.engine import decode_step, extend_step, StaticGraph
    from ttt_jax import sharding
    from ttt_jax.models.lm import CausalLM, check_cacheable
    from ttt_jax.train.trainer import check_batch_divisible

    if mesh.shape["context"] > 1:
        raise ValueError("--what generate: cached inference does not split a sequence over devices; "
                         "set mesh.context=1 (give the devices to mesh.data / mesh.fsdp / mesh.tensor)")
    model_cfg = cfg.model
    runtime = dc.replace(cfg.runtime, scan_layers=False)   # the engine walks the layers one by one
    check_cacheable(model_cfg)
    batch = cfg.data.batch_size * processes
    check_batch_divisible(batch, mesh)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(model_cfg, runtime=runtime, rngs=nnx.Rngs(0))))
    state_sh = sharding.state_shardings(state, mesh)
    abs_state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state, state_sh)
    rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
    cache = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rows if x.ndim else None),
                         jax.eval_shape(lambda: init_cache(model_cfg, batch, prompt_len + 1)))
    static = StaticGraph(graphdef)
    target = platform_lib.mesh_platform(mesh)   # as Engine(platform=...) on the slice: the Pallas kernel
    sds = jax.ShapeDtypeStruct
    out = []
    for what in ("prefill", "decode"):
        t0 = time.perf_counter()
        with jax.set_mesh(mesh), platform_lib.target(target):
            if what == "prefill":
                lowered = extend_step.lower(static, abs_state, cache, sds((batch, prefill_block), jnp.int32, sharding=rows),
                                            sds((batch,), jnp.int32, sharding=rows), {}, logits="last",
                                            attn_impl="auto", attn_block=512, attn_platform=target)
            else:
                lowered = decode_step.lower(static, abs_state, cache, sds((batch,), jnp.int32, sharding=rows),
                                            sds((batch,), jnp.bool_, sharding=rows), {},
                                            jax.eval_shape(lambda: jax.random.key(0)), sds((), jnp.float32),
                                            sds((), jnp.int32), sds((), jnp.float32), attn_impl="auto",
                                            attn_block=512, attn_platform=target)
            compiled = lowered.compile()
        out.append(Compiled(what, compiled, time.perf_counter() - t0, batch,
                            prefill_block if what == "prefill" else 1))
    return out


class DoesNotFit(RuntimeError):
    """The TPU compiler refused the program: its temporaries alone exceed HBM."""

    def __init__(self, message: str, temp_bytes: int, state_bytes: int, compile_s: float):
        super().__init__(message)
        self.temp_bytes, self.state_bytes, self.compile_s = temp_bytes, state_bytes, compile_s


def _shard_bytes(x) -> int:
    """Bytes of one device's shard of an abstract array (its sharding's shard shape)."""
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
    return int(np.prod(shape)) * jnp.dtype(x.dtype).itemsize


@dataclasses.dataclass
class Report:
    """What ``ttt-jax compile`` prints and writes (``--json``). Bytes and FLOPs per chip unless named."""

    what: str
    topology: str
    chips: int
    mesh: dict
    global_batch: int
    seq_len: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    peak_bytes: int
    hbm_bytes: int
    fits: bool
    model_flops_per_step: float
    collectives: dict
    mosaic_calls: int
    mosaic_ops: list
    attention_mosaic_fwd: int
    attention_mosaic_bwd: int
    attention_fallback: list
    compile_s: float
    est_compute_s: float
    est_memory_s: float
    est_ici_s: float
    est_dcn_s: float
    est_executed_flops: float
    est_step_s: float
    est_step_serial_s: float
    est_mfu: float
    est_mfu_serial: float
    largest_live: list = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _attention_fallback(text: str, min_queries: int = 64) -> list[str]:
    """Attention scopes whose softmax XLA computes (a Mosaic kernel keeps its ``exp`` inside).

    The tell-tale: ``exp`` of a logits block under an attention scope, i.e. of rank >= 4 with its
    last dimension (``Tk``) >= 64 and the one before it (``Tq``) >= ``min_queries``. Training
    programs keep the default 64: a ring's online merge of kernel outputs only exponentiates
    ``[B, (KV, G,) T]`` log-sum-exps, whose next-to-last dimension is a head count. Inference
    programs (no ring: ``--what generate`` needs ``mesh.context=1``) pass 1, so that a decode step's
    ``[B, KV, G, 1, S]`` logits count too. Op names with digits folded."""
    import re

    names = set()
    for line in hlo.logical_lines(text):
        m = re.match(r"\s*(?:ROOT )?%?\S+ = (\w+)\[([\d,]*)\]\S* exponential\(", line)
        dims = [int(d) for d in m.group(2).split(",") if d] if m else []
        if len(dims) < 4 or dims[-1] < 64 or dims[-2] < min_queries:
            continue
        op = re.search(r'op_name="([^"]*)"', line)
        if op and hlo.is_attention_op(op.group(1)):
            names.add(re.sub(r"\d+", "#", op.group(1).split("/exp")[0]))
    return sorted(names)


def analyse(cfg: Config, c: Compiled, topo: Topology, mesh: Mesh) -> Report:
    text = c.compiled.as_text()
    ma = c.compiled.memory_analysis()
    args, outs = int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes)
    alias, temp = int(ma.alias_size_in_bytes), int(ma.temp_size_in_bytes)
    peak = args + outs - alias + temp
    devices = list(mesh.devices.flat)
    slice_of = [getattr(d, "slice_index", 0) or 0 for d in devices] if topo.num_slices > 1 else None
    coll = hlo.collective_bytes(text, slice_of)
    kernels = hlo.kernel_calls(text)
    fallback = _attention_fallback(text, min_queries=64 if c.what == "train" else 1)
    attn_fwd, attn_bwd = hlo.attention_kernel_calls(text)
    # One chip per device on v5e/v5p/v6e (megacore); v4 topologies list each TensorCore.
    per_chip = max(1, len(devices) // topo.chips)
    hbm = topo.chip.hbm_bytes // per_chip
    tokens = c.global_batch * c.seq_len
    if c.what == "train":
        flops = flops_per_token(cfg.model, c.seq_len) * tokens
    else:   # forward only; a query sees about the whole cache (data.seq_len keys), window-capped
        flops = _forward_flops_per_token(cfg.model, cfg.data.seq_len) * tokens
    chip = topo.chip
    try:
        ca = c.compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        hbm_traffic = float(ca.get("bytes accessed", 0.0))
        hlo_flops = float(ca.get("flops", 0.0)) * per_chip * topo.chips
    except Exception:   # cost analysis is optional per backend
        hbm_traffic, hlo_flops = 0.0, 0.0
    executed = _executed_flops(cfg, c, hlo_flops, attn_fwd > 0)
    peak_flops = topo.chips * chip.peak_bf16_tflops * 1e12
    compute_s = max(executed, flops) / peak_flops
    memory_s = hbm_traffic * per_chip / (chip.hbm_gbps * 1e9)
    ici = sum(v["ici"] for v in coll.values()) * per_chip
    dcn = sum(v["dcn"] for v in coll.values()) * per_chip
    ici_s, dcn_s = ici / (chip.ici_gbps * 1e9), dcn / (chip.dcn_gbps_per_chip * 1e9)
    # Two bounds: every term hidden under the largest (perfect overlap), or none hidden.
    step_s = max(compute_s, memory_s, ici_s + dcn_s)
    serial_s = compute_s + memory_s + ici_s + dcn_s
    mfu, mfu_serial = ((flops / peak_flops / s if s > 0 else 0.0) for s in (step_s, serial_s))
    return Report(
        what=c.what, topology=topo.slice_name, chips=topo.chips, mesh=dict(mesh.shape),
        global_batch=c.global_batch, seq_len=c.seq_len, argument_bytes=args, output_bytes=outs,
        alias_bytes=alias, temp_bytes=temp, peak_bytes=peak, hbm_bytes=hbm,
        fits=peak <= FIT_FRACTION * hbm, model_flops_per_step=flops, collectives=coll,
        mosaic_calls=len(kernels), mosaic_ops=sorted(set(kernels)), attention_mosaic_fwd=attn_fwd,
        attention_mosaic_bwd=attn_bwd, attention_fallback=fallback,
        compile_s=c.compile_s, est_compute_s=compute_s, est_memory_s=memory_s, est_ici_s=ici_s,
        est_dcn_s=dcn_s, est_executed_flops=executed, est_step_s=step_s, est_step_serial_s=serial_s,
        est_mfu=mfu, est_mfu_serial=mfu_serial)


def _executed_flops(cfg: Config, c: Compiled, hlo_flops: float, attention_in_kernels: bool) -> float:
    """FLOPs the chips execute per step: XLA's count of the compiled program (recomputation under
    remat included) plus the attention inside Mosaic kernels, which XLA's cost analysis cannot see
    (the analytic attention FLOPs, a third more when remat recomputes the forward pass). 0 when the
    backend gives no cost analysis."""
    if hlo_flops <= 0:
        return 0.0
    if not attention_in_kernels:
        return hlo_flops
    from ttt_jax.models.flops import attention_flops_per_token

    tokens = c.global_batch * c.seq_len
    if c.what == "train":
        kernel = attention_flops_per_token(cfg.model, c.seq_len) * tokens
        kernel *= 4 / 3 if cfg.runtime.remat else 1.0
    else:
        kernel = attention_flops_per_token(cfg.model, cfg.data.seq_len) * tokens / 3
    return hlo_flops + kernel


def _forward_flops_per_token(m, keys: int) -> float:
    """Inference FLOPs per token with ``keys`` cached keys (``ttt_jax.models.flops`` conventions:
    ``2 N_matmul`` + ``4 keys H Dh`` per layer + the TTT layers' forward share)."""
    from ttt_jax.models.flops import matmul_params

    h, dh, d, f = m.n_heads, m.resolved_head_dim, m.d_model, m.d_ff
    total = 2.0 * matmul_params(m)
    for layer in range(m.n_layers):
        w = m.layer_window(layer)
        total += 4.0 * (min(keys, w) if w else keys) * h * dh
    total += len(m.ttt.layer_ids(m.n_layers)) * (2 * d * d + 2 * m.ttt.conv_kernel * d + 4 * f * d)
    return total


def largest_live(text: str, top: int = 3) -> list[tuple[int, str, str]]:
    """``(bytes, shape, op name)`` of the largest values live at the memory peak
    (:func:`ttt_jax.bench.hlo_memory.analyse`)."""
    from ttt_jax.bench.hlo_memory import analyse as live_analyse

    rep = live_analyse(text)
    return [(v.bytes, v.shape, v.op_name or f"<{v.opcode}>") for v in rep.live[:top]]


def _ratio(executed: float, model: float) -> str:
    return f"{executed / model:.2f}" if executed > 0 and model > 0 else "n/a"


def format_report(r: Report) -> str:
    g = GIB
    mesh = " x ".join(f"{a}={n}" for a, n in r.mesh.items())
    lines = [
        f"{r.what} step on {r.topology} ({r.chips} chips), mesh {mesh}; global batch {r.global_batch} "
        f"x {r.seq_len} tokens",
        f"memory per chip: arguments {r.argument_bytes / g:.2f} GiB, temporaries {r.temp_bytes / g:.2f} "
        f"GiB, outputs {r.output_bytes / g:.2f} GiB (aliased {r.alias_bytes / g:.2f}); peak estimate "
        f"{r.peak_bytes / g:.2f} GiB of {r.hbm_bytes / g:.0f} GiB HBM ({100 * r.peak_bytes / r.hbm_bytes:.0f}%)",
        f"fits: {'yes' if r.fits else 'no'} (rule: peak <= {FIT_FRACTION:.0%} of HBM)",
        f"model FLOPs per step: {r.model_flops_per_step:.3e} (analytic, ttt_jax.models.flops)",
        "collectives per chip per step:",
    ]
    for kind, v in r.collectives.items():
        if v["count"]:
            lines.append(f"  {kind:19s} ICI {v['ici'] / g:9.3f} GiB   DCN {v['dcn'] / g:9.3f} GiB   "
                         f"({v['count']} executions)")
    fb = ("none" if not r.attention_fallback else
          "YES, XLA attention in: " + ", ".join(r.attention_fallback[:4]))
    lines += [
        f"kernels: {r.mosaic_calls} Mosaic (Pallas TPU) call sites, {r.attention_mosaic_fwd} in attention "
        f"forward and {r.attention_mosaic_bwd} in its backward; attention fallen back to XLA: {fb}",
        f"compile time: {r.compile_s:.1f} s",
        f"estimate (roofline from chip peaks, not a measurement): step {r.est_step_s:.3f}-"
        f"{r.est_step_serial_s:.3f} s, MFU {100 * r.est_mfu_serial:.0f}-{100 * r.est_mfu:.0f}% (all of "
        f"compute {r.est_compute_s:.3f} s, HBM {r.est_memory_s:.3f}, ICI {r.est_ici_s:.3f}, DCN "
        f"{r.est_dcn_s:.3f} overlapped, or none; executed / model FLOPs "
        f"{_ratio(r.est_executed_flops, r.model_flops_per_step)})",
    ]
    return "\n".join(lines)
