"""TPU generations, slice names and the chip figures the roofline estimate uses.

Slice names follow Cloud TPU's accelerator types: ``v4-N`` and ``v5p-N`` count TensorCores (two per
chip), ``v5e-N`` (``v5litepod-N``) and ``v6e-N`` count chips. An explicit ``GEN:AxBxC`` names the chip
grid directly (``v5p:4x4x4``, ``v6e:16x16``), as :func:`jax.experimental.topologies.get_topology_desc`
takes it.

Chip figures (per chip, dense bf16, from Google's Cloud TPU system-architecture pages):

* v4:  https://cloud.google.com/tpu/docs/v4  -- 275 TFLOP/s, 32 GiB HBM2 at 1,200 GB/s,
  ICI 6 links; "Interchip Interconnect BW 2,400 Gbps" (300 GB/s per chip).
* v5e: https://cloud.google.com/tpu/docs/v5e -- 197 TFLOP/s, 16 GiB HBM2 at 819 GB/s,
  "Interchip Interconnect BW 1,600 Gbps" (200 GB/s).
* v5p: https://cloud.google.com/tpu/docs/v5p -- 459 TFLOP/s, 95 GiB HBM2e at 2,765 GB/s,
  "Interchip Interconnect BW 4,800 Gbps" (600 GB/s).
* v6e: https://cloud.google.com/tpu/docs/v6e -- 918 TFLOP/s, 32 GiB HBM at 1,640 GB/s,
  "Interchip Interconnect BW 3,584 Gbps" (448 GB/s).

DCN (between slices) is a host NIC shared by the host's chips; 200 Gbit/s per host (25 GB/s, four
chips) is the figure assumed here (Cloud TPU multislice hosts; the real figure depends on the
deployment), i.e. 6.25 GB/s per chip. These are peak figures: the step time built from them is a
lower bound (an estimate), not a measurement.
"""

from __future__ import annotations

import dataclasses
import math
import re

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    generation: str          # "v5p", ...
    hbm_bytes: int           # per chip
    peak_bf16_tflops: float  # per chip, dense
    hbm_gbps: float          # GB/s per chip
    ici_gbps: float          # GB/s per chip, all links together
    dcn_gbps_per_chip: float  # GB/s per chip (host NIC / chips per host), assumed
    cores_per_chip: int      # TensorCores; slice names of v4/v5p count these
    dims: int                # torus/mesh dimensionality of a slice (3 for v4/v5p, 2 for v5e/v6e)


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32 * GIB, 275.0, 1200.0, 300.0, 6.25, 2, 3),
    "v5e": Chip("v5e", 16 * GIB, 197.0, 819.0, 200.0, 6.25, 1, 2),
    "v5p": Chip("v5p", 95 * GIB, 459.0, 2765.0, 600.0, 6.25, 2, 3),
    "v6e": Chip("v6e", 32 * GIB, 918.0, 1640.0, 448.0, 6.25, 1, 2),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "trillium": "v6e"}
# The generation name libtpu's topology descriptions take.
_TOPOLOGY_PREFIX = {"v4": "v4", "v5e": "v5e", "v5p": "v5p", "v6e": "v6e"}

# Chip grids of the standard slice shapes (chips -> grid), as Cloud TPU allocates them.
_GRIDS_3D = {1: (1, 1, 1), 2: (1, 2, 1), 4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4),
             64: (4, 4, 4), 128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
             2048: (8, 16, 16), 4096: (16, 16, 16), 8192: (16, 16, 32)}
_GRIDS_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
             256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice: its chip, chip grid and number of slices (multi-slice over DCN)."""

    chip: Chip
    grid: tuple[int, ...]
    num_slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.grid)

    @property
    def chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def topology_name(self) -> str:
        """The name :func:`jax.experimental.topologies.get_topology_desc` takes."""
        return f"{_TOPOLOGY_PREFIX[self.chip.generation]}:{'x'.join(map(str, self.grid))}"

    @property
    def slice_name(self) -> str:
        n = self.chips_per_slice * (self.chip.cores_per_chip if self.chip.generation in ("v4", "v5p") else 1)
        name = f"{self.chip.generation}-{n}"
        return name if self.num_slices == 1 else f"{self.num_slices} x {name}"


def _chip(gen: str, name: str) -> Chip:
    gen = _ALIASES.get(gen.lower(), gen.lower())
    if gen not in CHIPS:
        raise ValueError(f"--topology {name!r}: unknown TPU generation {gen!r}; expected one of "
                         f"{sorted(CHIPS)} (GPU platforms are not supported by `ttt-jax compile`)")
    return CHIPS[gen]


def parse_topology(name: str, num_slices: int = 1) -> Topology:
    """``v5p-128`` / ``v6e-256`` / ``v5e-16`` / ``v5p:4x4x4`` -> :class:`Topology` (``ValueError`` with
    the accepted forms otherwise)."""
    if num_slices < 1:
        raise ValueError(f"--num-slices must be >= 1, got {num_slices}")
    name = name.strip()
    m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", name.lower())
    if m:
        chip = _chip(m.group(1), name)
        grid = tuple(int(x) for x in m.group(2).split("x"))
        if len(grid) != chip.dims or min(grid) < 1:
            raise ValueError(f"--topology {name!r}: a {chip.generation} grid has {chip.dims} "
                             f"dimensions (e.g. {chip.generation}:{'x'.join(['2'] * chip.dims)})")
        return Topology(chip, grid, num_slices)
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", name.lower())
    if m is None:
        raise ValueError(f"--topology {name!r}: expected a slice name such as v5p-128, v6e-256, "
                         "v5e-16, v4-32, or a chip grid such as v5p:4x4x4 or v6e:16x16")
    chip = _chip(m.group(1), name)
    n = int(m.group(2))
    per = chip.cores_per_chip if chip.generation in ("v4", "v5p") else 1
    grids = _GRIDS_3D if chip.dims == 3 else _GRIDS_2D
    if n % per or n // per not in grids:
        valid = ", ".join(f"{chip.generation}-{c * per}" for c in sorted(grids))
        raise ValueError(f"--topology {name!r}: not a standard {chip.generation} slice; valid: {valid} "
                         f"(or give the chip grid, e.g. {chip.generation}:{'x'.join(['2'] * chip.dims)})")
    return Topology(chip, grids[n // per], num_slices)
