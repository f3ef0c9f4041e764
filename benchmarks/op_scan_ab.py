"""A/B of two versions of the chunk scan (``ttt_jax/ops/inplace_ttt_scan.py``) in one process on
one GPU: the module as it was at another commit (``--before``) against the working tree's, beside the
bf16 dense layer (``plain``) and ``impl="pallas"`` at 32k / 1024, with the rows of
``op_kernel_gpu.py`` (forward output returned with the gradients). Prints one JSON line per row,
with the relative error of every output and gradient against the ``before`` row and, as a check that
the comparison can see a difference, the error of a 1% perturbation; writes the compiled program of
the working tree's scan at 32k / 1024 to ``--hlo-out`` and prints its cuBLAS GEMM calls and their
``beta`` (1: the GEMM accumulates into its output).

    git show fd59e37~1:ttt_jax/ops/inplace_ttt_scan.py > /tmp/scan_before.py
    PYTHONPATH=$PWD python benchmarks/op_scan_ab.py --before /tmp/scan_before.py --hlo-out $OUT/scan.hlo
"""
import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import op_kernel_gpu as B
from ttt_jax.ops import inplace_ttt
from ttt_jax.ops import inplace_ttt_scan as new_scan
from ttt_jax.ops.inplace_ttt_layout import chunk_layout, pad_to_chunks, unchunk
from ttt_jax.bench import op as op_bench

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--before", required=True, help="path of the scan module to compare against")
ap.add_argument("--hlo-out", required=True)
cli = ap.parse_args()
spec = importlib.util.spec_from_file_location("old_scan", cli.before)
old_scan = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old_scan)

def via(mod):
    def fn(z, v, w0, *, lr, chunk_size):
        b, t, f = z.shape
        lay = chunk_layout(b, t, chunk_size)
        s0 = jnp.zeros((b, f, v.shape[-1]), jnp.float32)
        vm = pad_to_chunks(v, chunk_size) * lay.upd[..., None].astype(v.dtype)
        out, _ = mod.scan_chunks(pad_to_chunks(z, chunk_size), vm, w0, lay.use, lay.a, s0, lr, None, False)
        return unchunk(out, t)
    return fn

rows = []
shapes = [(32768, 1024), (32768, 4096), (131072, 1024)]
d, f = 2560, 9728
for t, c in shapes:
    z, v, w0, cot = B._inputs(t, d, f)
    res = {}
    base = None
    for name, fn in [("plain", op_bench.plain), ("scan_old", via(old_scan)), ("scan_new", via(new_scan)),
                     ("pallas", lambda z, v, w0, lr, chunk_size: inplace_ttt(z, v, w0, lr=lr, chunk_size=chunk_size, impl="pallas"))]:
        if (t, c) != (32768, 1024) and name == "pallas":
            continue
        try:
            row, result = B._jax_row(name if name == "plain" else "x", fn, (z, v, w0, cot), t, c, d, f, 2, 5)
        except Exception as e:
            print(json.dumps(dict(name=name, T=t, C=c, error=str(e)[:300])), flush=True); continue
        row["impl"] = name
        if name == "plain": base = row
        else:
            row["ratio"] = row["ms"] / base["ms"]; row["extra_gib"] = row["temp_gib"] - base["temp_gib"]
            res[name] = result
        if name != "scan_old" and "scan_old" in res and name != "plain":
            o = res["scan_old"]
            row["rel_vs_old"] = [B._rel(a, b) for a, b in zip([result[0], *result[1]], [o[0], *o[1]])]
            row["sanity_rel_1pct"] = B._rel(o[0] * 1.01, o[0])
        row.pop("ms_all", None)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if t == 32768 and c == 1024:
        # What the new scan's loops compile to: GEMM custom calls and their beta.
        def run(z, v, w0, cot):
            out, vjp = jax.vjp(lambda z, v, w0: via(new_scan)(z, v, w0, lr=0.01, chunk_size=c), z, v, w0)
            return out, vjp(cot)
        txt = jax.jit(run).lower(z, v, w0, cot).compile().as_text()
        Path(cli.hlo_out).write_text(txt)
        betas = re.findall(r'"beta":([0-9.]+)', txt)
        print(json.dumps(dict(kind="hlo", gemm_calls=len(re.findall(r'custom_call_target="__cublas', txt)),
                              betas=betas, fusions=len(re.findall(r'fusion\(', txt)))), flush=True)
    del z, v, w0, cot, res
