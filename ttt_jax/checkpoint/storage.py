"""Where the steps of a checkpoint directory are, local or at a URL (:mod:`ttt_jax.fs`).

Orbax finishes a step in one of two ways, chosen here by the directory's kind:

* **local** -- written into ``<step>.orbax-checkpoint-tmp-<time>`` and renamed to ``<step>`` when
  complete (a rename is atomic on a filesystem). An unfinished step is a directory with
  :data:`TMP_MARKER` in its name.
* **URL** (``gs://...``) -- written in place into ``<step>/`` and marked complete by its
  :data:`COMMIT_FILE` (object stores have no atomic directory rename; this is Orbax's own default
  for ``gs://``, asked for here for every URL). An unfinished step is a ``<step>/`` without it.

Every reader and writer of run checkpoints opens its Orbax manager with :func:`manager_options`
and lists steps with :func:`complete_steps` / :func:`unfinished`, so the two agree.
"""

from __future__ import annotations

from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint.path import atomicity

from ttt_jax.fs import AnyPath, is_remote

# Orbax's marker in the name of a step directory that is still being (or was never fully) written.
TMP_MARKER = ".orbax-checkpoint-tmp"
# The file Orbax writes into a step directory when the step is complete.
COMMIT_FILE = getattr(atomicity, "COMMIT_SUCCESS_FILE", "commit_success.txt")


def manager_options(directory: AnyPath, **kw: Any) -> ocp.CheckpointManagerOptions:
    """``CheckpointManagerOptions(**kw)`` for ``directory``: with the commit-file completion of
    steps for a URL."""
    if is_remote(directory):
        kw.setdefault("temporary_path_class", atomicity.CommitFileTemporaryPath)
    return ocp.CheckpointManagerOptions(**kw)


def is_complete(step_dir: AnyPath) -> bool:
    """Whether ``step_dir`` (``<dir>/<step>``) holds a complete step: a ``state`` item, and, at a
    URL, the commit file."""
    if not (step_dir / "state").exists():
        return False
    return not is_remote(step_dir) or (step_dir / COMMIT_FILE).exists()


def complete_steps(ckdir: AnyPath) -> list[int]:
    """The complete steps in the checkpoints directory ``ckdir``, oldest first."""
    if not ckdir.is_dir():
        return []
    return sorted(int(c.name) for c in ckdir.iterdir() if c.name.isdigit() and is_complete(c))


def unfinished(ckdir: AnyPath, step: int | None = None) -> list[AnyPath]:
    """Directories in ``ckdir`` of saves that never completed (of ``step`` only, if given): the
    temporary directories of local saves; at a URL also ``<step>/`` without the commit file."""
    if not ckdir.is_dir():
        return []
    found = []
    for p in ckdir.iterdir():
        name = p.name
        if TMP_MARKER in name:
            if step is None or name.startswith(f"{step}{TMP_MARKER}"):
                found.append(p)
        elif is_remote(ckdir) and name.isdigit() and (step is None or int(name) == step) \
                and not (p / COMMIT_FILE).exists():
            found.append(p)
    return sorted(found, key=str)
