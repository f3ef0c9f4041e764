"""Runs ``ttt-jax bench op`` from a source checkout (no install needed); see ttt_jax/bench/op.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ttt_jax.bench.op import main  # noqa: E402

if __name__ == "__main__":
    main()
