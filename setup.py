"""Package list for setuptools; everything else is in pyproject.toml.

The presets live in the top-level ``configs/`` folder (the source of truth) and ship inside the wheel
as the package ``ttt_jax.configs``, so an installed ``ttt-jax`` finds them with
``importlib.resources`` from any directory. Likewise the top-level ``parallel/`` folder ships as
``ttt_jax.parallel``, so the wheel installs no top-level name but ``ttt_jax``. pyproject.toml's ``[tool.setuptools]`` table cannot add
``package-dir``-mapped packages to an automatic ``find``, hence this file.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["ttt_jax", "ttt_jax.*"]) + ["ttt_jax.configs", "ttt_jax.parallel"],
    package_dir={"ttt_jax.configs": "configs", "ttt_jax.parallel": "parallel"},
    package_data={"ttt_jax.configs": ["*.yaml", "research/*.yaml"]},
)
