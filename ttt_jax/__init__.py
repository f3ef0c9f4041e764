"""ttt-jax: In-Place Test-Time Training for Transformer language models in JAX/Flax.

The parallelism building blocks live in the source tree's top-level ``parallel/`` folder (the
project's layout) and are imported as ``ttt_jax.parallel``. A built wheel installs that folder as
the subpackage ``ttt_jax/parallel`` (see setup.py), so the distribution adds no top-level module
named ``parallel`` that could clash with another one. Run from a source checkout (``PYTHONPATH``
or an editable install), ``ttt_jax/parallel`` does not exist on disk, and the lines below load the
sibling ``parallel/`` folder under the same name.
"""

import importlib.util as _util
import sys as _sys
from pathlib import Path as _Path


def _load_source_parallel() -> None:
    here = _Path(__file__).resolve().parent
    if (here / "parallel").is_dir() or "ttt_jax.parallel" in _sys.modules:
        return  # an installed wheel: a regular subpackage
    folder = here.parent / "parallel"
    spec = _util.spec_from_file_location("ttt_jax.parallel", folder / "__init__.py",
                                         submodule_search_locations=[str(folder)])
    if spec is None or spec.loader is None:
        raise ImportError(f"ttt_jax's parallel package is missing: neither {here / 'parallel'} nor {folder} exists")
    module = _util.module_from_spec(spec)
    _sys.modules["ttt_jax.parallel"] = module
    spec.loader.exec_module(module)


_load_source_parallel()
