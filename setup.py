"""Package list for setuptools; everything else is in pyproject.toml.

The presets live in the top-level ``configs/`` folder (the source of truth) and ship inside the wheel
as the package ``ttt_jax.configs``, so an installed ``ttt-jax`` finds them with
``importlib.resources`` from any directory. pyproject.toml's ``[tool.setuptools]`` table cannot add a
``package-dir``-mapped package to an automatic ``find``, hence this file.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["ttt_jax", "ttt_jax.*", "parallel", "parallel.*"]) + ["ttt_jax.configs"],
    package_dir={"ttt_jax.configs": "configs"},
    package_data={"ttt_jax.configs": ["*.yaml", "research/*.yaml"]},
)
