"""Number formatting for benchmark tables: a figure with sensible precision, ``n/a`` when unknown."""

from __future__ import annotations

import math
from typing import Optional


def num(x: Optional[float], unit: str = "", *, digits: int = 3) -> str:
    """``x`` with about ``digits`` significant digits (no exponent for everyday sizes), ``n/a`` for
    ``None``/NaN/inf. ``num(0.0512, " TFLOP/s") == "0.0512 TFLOP/s"``, ``num(1234.5) == "1234"``."""
    if x is None or not math.isfinite(x):
        return "n/a"
    if x == 0:
        return f"0{unit}"
    mag = math.floor(math.log10(abs(x)))
    decimals = max(0, digits - 1 - mag)
    if decimals > 6:
        return f"{x:.{digits - 1}e}{unit}"
    return f"{x:.{decimals}f}{unit}"


def pct(frac: Optional[float]) -> str:
    """A fraction as a percentage (``0.511`` -> ``"51.1%"``), ``n/a`` when unknown."""
    if frac is None or not math.isfinite(frac):
        return "n/a"
    return num(100 * frac, "%", digits=3)
