"""Training metrics: throughput, TFLOP/s, MFU, and the writers (JSONL, TensorBoard, tqdm).

Definitions (per logged interval of ``n`` steps taking ``dt`` seconds of wall-clock, compile excluded):

* ``tokens_per_s = n * batch_size * seq_len / dt`` -- every position processed, padding included;
* ``tflops_per_s = tokens_per_s * flops_per_token / 1e12``, where ``flops_per_token`` is the analytic
  training cost (forward + backward) of :func:`ttt_jax.models.flops.flops_per_token`;
* ``mfu = tflops_per_s / (peak_tflops_per_device * n_devices)``;
* ``peak_memory_gib``: the device's ``peak_bytes_in_use`` so far (largest over local devices; only
  on backends that count it, e.g. GPUs).

A run directory at a URL (``gs://...``, :mod:`ttt_jax.fs`) gets the same files: they are written
into a local staging folder and copied up at every checkpoint (:meth:`MetricsWriter.sync`), every
:data:`SYNC_SECONDS` while records come, and at the end (object stores cannot append).

The peak is ``train.peak_tflops`` when set, otherwise looked up from the device kind in
:data:`PEAK_TFLOPS` (dense bf16 tensor-core figures, so an fp32-compute run shows a low MFU by
construction). Unknown devices (CPUs included) give ``mfu = None`` (``null`` in the JSONL).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from ttt_jax import fs

# Dense bf16 peak TFLOP/s per device, matched by substring of ``jax.Device.device_kind`` (lowercased),
# first match wins (so the more specific names come first).
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("h200", 989.0),
    ("h100", 989.0),      # SXM; PCIe parts are lower -- set train.peak_tflops
    ("a100", 312.0),
    ("tpu v6 lite", 918.0),
    ("tpu v6e", 918.0),
    ("tpu v5 lite", 197.0),
    ("tpu v5e", 197.0),
    ("tpu v5p", 459.0),
    ("tpu v5", 459.0),
    ("tpu v4", 275.0),
)


def peak_tflops_per_device(device_kind: str, override: Optional[float] = None) -> Optional[float]:
    """Peak TFLOP/s of one device of ``device_kind``; ``override`` wins; ``None`` when unknown."""
    if override is not None:
        return float(override)
    kind = device_kind.lower()
    for key, peak in PEAK_TFLOPS:
        if key in kind:
            return peak
    return None


def throughput(steps: int, seconds: float, tokens_per_step: int, flops_per_token: float,
               n_devices: int, peak_per_device: Optional[float]) -> dict[str, Optional[float]]:
    """``tokens_per_s``, ``tflops_per_s`` and ``mfu`` (None without a peak) for ``steps`` in ``seconds``."""
    tokens_per_s = steps * tokens_per_step / max(seconds, 1e-9)
    tflops = tokens_per_s * flops_per_token / 1e12
    mfu = tflops / (peak_per_device * n_devices) if peak_per_device else None
    return {"tokens_per_s": tokens_per_s, "tflops_per_s": tflops, "mfu": mfu}


def peak_device_memory_gib() -> Optional[float]:
    """Largest ``peak_bytes_in_use`` over this process's devices in GiB; None where the backend
    keeps no such counter (CPU)."""
    import jax

    peaks = []
    for d in jax.local_devices():
        try:
            stats = d.memory_stats()
        except Exception:  # some backends raise instead of returning None
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"])
    return max(peaks) / 2**30 if peaks else None


def _finite_or_none(x: Any) -> Any:
    # JSON has no NaN/Infinity; write them as strings so the line stays valid JSON.
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return str(x)
    return x


def truncate_metrics(path: fs.AnyPath, step: int) -> int:
    """Drop the records of ``path`` (``metrics.jsonl``, local or at a URL) that a run restarting
    from ``step`` writes again: those after ``step`` (all of them when ``step`` is 0), and any line
    cut short by a kill. Rewritten atomically; returns the number of lines dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
            ok = line.endswith("\n") and step > 0 and int(rec["step"]) <= step
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            keep.append(line)
    if len(keep) < len(lines):
        fs.write_text(path, "".join(keep))
    return len(lines) - len(keep)


# How often (seconds) the files of a run directory at a URL are copied up while records come.
SYNC_SECONDS = 60.0


class MetricsWriter:
    """Writes metric records to ``run_dir/metrics.jsonl`` (always), TensorBoard event files under
    ``run_dir/tensorboard`` (when ``tensorboard``), and a tqdm bar on stderr (when ``progress``).

    Records are appended, so a resumed run continues the same file; records of steps after
    ``initial_step`` (written by a run that was killed after its last checkpoint, and redone by this
    one) are dropped first, so that every step appears once. TensorBoard gets finite values only
    (a non-finite loss is in the JSONL record, as a string).

    ``run_dir`` at a URL: ``metrics.jsonl`` is read into a local staging folder (and cut back
    there), TensorBoard writes its events there, and :meth:`sync` copies both up (the JSONL whole,
    the event files that grew). A copy that fails is a warning line, retried at the next sync; if
    the last one fails the staging folder is kept and named.
    """

    def __init__(self, run_dir: str | Path, *, total_steps: int, initial_step: int = 0,
                 tensorboard: bool = True, progress: bool = True, is_main: bool = True):
        self.run_dir = fs.as_path(run_dir, "run directory")
        self.is_main = is_main
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self._jsonl = None
        self._tb = None
        self._bar = None
        self._bar_step = initial_step
        self._stage: Optional[Path] = None   # local staging folder of a run directory at a URL
        self._uploaded: dict[str, int] = {}  # staged file -> size last copied up
        self._synced_at = time.monotonic()
        if not is_main:  # only process 0 writes on a multi-host run
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        local = self.run_dir
        if fs.is_remote(self.run_dir):
            local = self._stage = Path(tempfile.mkdtemp(prefix="ttt-jax-run-"))
            if self.jsonl_path.is_file():
                (local / "metrics.jsonl").write_text(self.jsonl_path.read_text())
                if truncate_metrics(local / "metrics.jsonl", initial_step):
                    fs.write_text(self.jsonl_path, (local / "metrics.jsonl").read_text())
        else:
            truncate_metrics(self.jsonl_path, initial_step)
        self._jsonl = open(local / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported lazily: only needed when enabled

            self._tb = SummaryWriter(logdir=str(local / "tensorboard"))
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step",
                             dynamic_ncols=True)
    def write(self, record: dict[str, Any]) -> None:
        """Write one record. ``record["kind"]`` is ``"train"`` or ``"eval"``; ``record["step"]``
        is the number of optimizer updates done; other numeric fields become TensorBoard scalars
        under ``<kind>/<name>``."""
        if not self.is_main:
            return
        clean = {k: _finite_or_none(v) for k, v in record.items()}
        self._jsonl.write(json.dumps(clean) + "\n")
        step = int(record["step"])
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool) \
                        and math.isfinite(v):
                    self._tb.add_scalar(f"{record['kind']}/{k}", v, step)
        if self._bar is not None and record["kind"] == "train":
            self._bar.update(step - self._bar_step)
            self._bar_step = step
            post = {"loss": f"{record['loss']:.4f}"}
            if record.get("tokens_per_s") is not None:
                post["tok/s"] = f"{record['tokens_per_s']:.3g}"
            if record.get("mfu") is not None:
                post["mfu"] = f"{100 * record['mfu']:.1f}%"
            if record.get("peak_memory_gib") is not None:
                post["mem"] = f"{record['peak_memory_gib']:.1f}G"
            self._bar.set_postfix(post, refresh=True)
        if self._stage is not None and time.monotonic() - self._synced_at > SYNC_SECONDS:
            self.sync()

    def sync(self) -> bool:
        """Make the records written so far durable in the run directory: flush TensorBoard and,
        for a run directory at a URL, copy the changed files up. ``False`` (after one warning line)
        when the copy failed; it is retried at the next sync."""
        if not self.is_main:
            return True
        if self._tb is not None:
            self._tb.flush()
        if self._stage is None:
            return True
        self._synced_at = time.monotonic()
        try:
            fs.upload_changed(self._stage, self.run_dir, self._uploaded)
        except Exception as e:  # noqa: BLE001 - a client's error; training goes on
            self.message(f"warning: copying the metrics and TensorBoard files to {self.run_dir} failed "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                         "retried at the next checkpoint")
            return False
        return True

    def message(self, msg: str) -> None:
        """Print ``msg`` above the progress bar (or plainly when there is none)."""
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._stage is not None:
            if self.sync():
                shutil.rmtree(self._stage, ignore_errors=True)
            else:
                self.message(f"warning: the metrics and TensorBoard files of this run are kept in "
                             f"{self._stage}; copy them to {self.run_dir}")
            self._stage = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
