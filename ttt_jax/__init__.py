"""ttt-jax: In-Place Test-Time Training for Transformer language models in JAX/Flax."""

import importlib.util as _util
from pathlib import Path as _Path


def _check_parallel() -> None:
    """The distribution ships a second import package with a generic name, ``parallel`` (the design
    card's top-level layout). Make sure the ``parallel`` Python would import is the one installed
    beside this package, not a user's ``parallel.py`` or another distribution's package that comes
    first on ``sys.path``; otherwise stop with one line that names it."""
    spec = _util.find_spec("parallel")
    ours = _Path(__file__).resolve().parent.parent / "parallel" / "__init__.py"
    found = _Path(spec.origin).resolve() if spec is not None and spec.origin else None
    if found != ours:
        raise ImportError(f"ttt_jax needs its own 'parallel' package ({ours}), but Python finds "
                          f"{found or 'none'}; remove or rename the other 'parallel' from sys.path")


_check_parallel()
