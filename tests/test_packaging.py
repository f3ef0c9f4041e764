"""The wheel works: build it, install it into a fresh virtual environment, run the CLI elsewhere.

Nothing is downloaded: the wheel is built with this environment's setuptools (no build isolation),
installed without dependencies, and the fresh environment reaches this environment's packages (jax,
flax, ...) through a ``.pth`` file. ``PYTHONPATH`` is cleared, so the CLI can only find ``ttt_jax``,
its presets and ``ttt_jax.parallel`` inside the installed wheel.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.integration]

# Building and installing takes ~30-70 s on a 2-core machine.

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env=None):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.mark.slow
def test_wheel_installs_and_runs_cli_from_any_directory(tmp_path):
    # Build from a copy, so the checkout gets no build/ or *.egg-info.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("ttt_jax", "parallel", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "-w", str(dist), str(src)], cwd=tmp_path)
    (wheel,) = dist.glob("ttt_jax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    assert presets and all(f"ttt_jax/configs/{p}" in names for p in presets)
    # The source tree's top-level parallel/ ships as ttt_jax.parallel: the wheel installs no other
    # top-level name that could clash with another distribution's module.
    assert "ttt_jax/parallel/__init__.py" in names
    assert {n.split("/")[0] for n in names} == {"ttt_jax", wheel.name.split("-")[0] + "-" +
                                                 wheel.name.split("-")[1] + ".dist-info"}

    # No PYTHONPATH anywhere below: pip would take a checkout's metadata for an installed ttt-jax, and
    # the CLI must find everything inside the wheel.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    venv = tmp_path / "venv"
    _run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(venv)],
         cwd=tmp_path)
    vpy = venv / "bin" / "python"
    vsite = Path(_run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                      cwd=tmp_path).strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    _run([sys.executable, "-m", "pip", "--python", str(vpy), "install", "-q", "--no-deps",
          str(wheel)], cwd=tmp_path, env=env)
    # After installing: with this environment's (editable) ttt-jax visible, pip would skip the wheel.
    (vsite / "_ttt_jax_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([str(vpy), "-c", "import ttt_jax, ttt_jax.config as c, ttt_jax.parallel as p; "
                  "print(ttt_jax.__file__); print(c.CONFIG_DIR); print(p.__file__)"],
                 cwd=elsewhere, env=env).split()
    assert all(Path(w).is_relative_to(vsite) for w in where), where

    out = _run([str(venv / "bin" / "ttt-jax"), "config", "tiny"], cwd=elsewhere, env=env)
    want = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    got = yaml.safe_load(out)
    assert got["model"]["d_model"] == want["model"]["d_model"]
    assert got["model"]["n_layers"] == want["model"]["n_layers"]


def test_a_foreign_parallel_module_changes_nothing(tmp_path):
    """A user's own ``parallel.py`` first on ``sys.path`` (run from a source checkout) is neither
    imported by ttt_jax nor shadowed by it: both are importable side by side."""
    (tmp_path / "parallel.py").write_text("x = 1\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    out = subprocess.run([sys.executable, "-c", "import ttt_jax, ttt_jax.parallel as ours, parallel as theirs; "
                          "print(ours.__file__); print(theirs.__file__); print(ours.make_mesh.__module__)"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    ours, theirs, module = out.stdout.split()
    assert Path(ours) == ROOT / "parallel" / "__init__.py"
    assert Path(theirs) == tmp_path / "parallel.py"
    assert module == "ttt_jax.parallel.mesh"
