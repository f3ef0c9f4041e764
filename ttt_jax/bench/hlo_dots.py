"""The matmuls of a lowered program, read from its StableHLO text.

Used by the benchmarks and tests to check that a benchmarked function really computes what it
claims: that its forward pass is not dropped (a fwd+bwd dense layer has three matmuls, not two) and
that no matmul of a low-precision program takes fp32 operands (which autodiff produces from an
fp32-result dot followed by a cast, and which runs at half the bf16 rate on an H100).
"""

from __future__ import annotations

import re
from typing import NamedTuple

_DOT = re.compile(r"stablehlo\.dot(?:_general)?\b[^\n]*?:\s*\((tensor<[^>]*>),\s*(tensor<[^>]*>)\)\s*->\s*"
                  r"(tensor<[^>]*>)")


class Dot(NamedTuple):
    """One matmul: operand and result types as StableHLO writes them (``tensor<8x16xbf16>``)."""

    lhs: str
    rhs: str
    out: str

    @staticmethod
    def dtype(t: str) -> str:
        return t[len("tensor<"):-1].split("x")[-1]

    @property
    def operand_dtypes(self) -> tuple[str, str]:
        return self.dtype(self.lhs), self.dtype(self.rhs)


def dots(stablehlo_text: str) -> list[Dot]:
    """Every ``dot_general`` in ``stablehlo_text`` (``jax.jit(f).lower(...).as_text()``)."""
    return [Dot(*m.groups()) for m in _DOT.finditer(stablehlo_text)]


def f32_operand_dots(stablehlo_text: str) -> list[Dot]:
    """The matmuls with an fp32 operand."""
    return [d for d in dots(stablehlo_text) if "f32" in d.operand_dtypes]
