"""The In-Place TTT op on TPU: what it needs from the chip, and the checks that prove it.

Choice: the op stays the XLA formulation of ``ttt_jax.ops.inplace_ttt_scan`` (and, under context
parallelism, ``ttt_jax.ops.inplace_ttt_cp`` with the summary exchange of ``ttt_jax.parallel.scan``); no
Pallas kernel. Why:

* Its matmuls are plain ``[C, F] x [F, D]``, ``[F, C] x [C, D]`` and ``[C, D] x [D, F]`` products
  per chunk -- exactly what XLA's TPU backend tiles onto the MXU. A Pallas kernel would only pay off
  by fusing the state update into the apply, which the chunk scan already keeps in one loop body.
* Every matmul takes the input dtype (bf16 in training) with fp32 accumulation: the fp32 state
  ``S`` is cast to the operand dtype at the matmul (``_mm`` of ``inplace_ttt_scan``), and the
  cross-device combine of ``ttt_jax.parallel.scan`` is a weighted *sum* (no dot). The compiled TPU program
  is checked for it: :func:`f32_operand_matmuls` lists every ``dot`` / ``convolution`` of an
  optimised HLO module whose operands are fp32 (the AOT test compiles the sharded op, forward and
  backward, for a v5p slice and expects none).
* Tiling: the MXU multiplies 128 x 128 tiles (v5p, v6e: 128 and 256). The chunk length is the
  contraction dimension of the update ``Z_i^T V_i`` and the row dimension of the apply, so it should
  be a multiple of 128 (the default, 1024, is). ``F`` and ``D`` need no explicit padding: XLA's TPU
  layouts tile every matmul operand as ``(8, 128)`` and pad the minor dimension themselves (the
  ``T(8,128)`` layouts of the compiled HLO). :func:`mxu_tiling_problem` says when a configuration
  wastes MXU work.
"""

from __future__ import annotations

import re
from typing import Optional

MXU = 128  # the MXU tile edge the chunk should be a multiple of (v4 / v5e / v5p; 256 on v6e)

_DEF = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[")
_MATMUL = re.compile(r"= (\w+)\[[^=]*?\b(dot|convolution)\(([^)]*)\)")


def mxu_tiling_problem(chunk_size: int, features: int, model_dim: int) -> Optional[str]:
    """Why ``chunk_size`` x ``features`` (F) x ``model_dim`` (D) tiles the MXU poorly (``None`` when
    it does not): a chunk that is not a multiple of 128 under-fills the update's contraction; F or
    D not a multiple of 128 is padded by XLA (work on the padding is wasted, reported too)."""
    problems = []
    if chunk_size % MXU:
        problems.append(f"TTT chunk_size {chunk_size} is not a multiple of {MXU} (the update's "
                        f"contraction under-fills the MXU; use {-(-chunk_size // MXU) * MXU})")
    for name, n in (("F", features), ("D", model_dim)):
        if n % MXU:
            waste = 1 - n / (-(-n // MXU) * MXU)
            problems.append(f"{name}={n} is padded to a multiple of {MXU} ({waste:.0%} of that "
                            "dimension's MXU work is padding)")
    return "; ".join(problems) or None


def matmul_operand_dtypes(hlo_text: str) -> list[tuple[str, str, list[str]]]:
    """``(op, result dtype, operand dtypes)`` of every ``dot`` / ``convolution`` in an optimised
    HLO module's text (operand dtypes looked up from their defining instructions; ``"?"`` where the
    text does not define the operand)."""
    types = {}
    for line in hlo_text.splitlines():
        m = _DEF.match(line)
        if m:
            types[m.group(1)] = m.group(2)
    found = []
    for line in hlo_text.splitlines():
        m = _MATMUL.search(line)
        if m:
            operands = re.findall(r"%([\w.\-]+)", m.group(3))
            found.append((m.group(2), m.group(1), [types.get(o, "?") for o in operands]))
    return found


def f32_operand_matmuls(hlo_text: str) -> list[tuple[str, str, list[str]]]:
    """The entries of :func:`matmul_operand_dtypes` with an fp32 (or fp64) operand."""
    return [m for m in matmul_operand_dtypes(hlo_text) if {"f32", "f64"} & set(m[2])]
