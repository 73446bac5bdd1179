"""Accelerator targets named as clouds sell them ("v5e-8", "v5p-64", "h100-8"), for compiling ahead of time.

A target is a chip (its HBM, peak bf16 FLOP/s and HBM bandwidth, from the vendors' spec sheets) and a slice
topology (how many chips, how they are wired, how many per host). `devices(target)` returns compile-only
devices of the real compiler on this host, no accelerator needed: TPU devices from libtpu (`pip install
"jax[tpu]"`) and CUDA devices from the CUDA plugin (`pip install "jax[cuda12]"`) run with JAX_PLATFORMS=cpu
and a GPU target config (the XLA `GpuTargetConfig` text proto kept in `pe_jax/assets`).

Spec sheets (per chip, bf16 dense):
  * TPU v4: 32 GiB HBM, 275 TFLOP/s, 1,228 GB/s; v5e: 16 GiB, 197 TFLOP/s, 819 GB/s; v5p: 95 GiB,
    459 TFLOP/s, 2,765 GB/s; v6e (Trillium): 32 GiB, 918 TFLOP/s, 1,640 GB/s: cloud.google.com/tpu/docs/
    v4, v5e, v5p and v6e ("System architecture" tables).
  * NVIDIA H100 SXM5 80 GB: 989 TFLOP/s dense bf16, 3.35 TB/s; H200 SXM 141 GB: 989 TFLOP/s, 4.8 TB/s:
    nvidia.com H100 and H200 datasheets (the sparse figures are twice these).
Slice names count chips for v5e / v6e and TensorCores for v4 / v5p (two per chip: v5p-8 is 4 chips).
Topologies and chips per host follow Google's (MaxText's accelerator table, GKE's TPU topology docs).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from importlib import resources

from pe_jax.errors import MissingDependency, UsageError

GiB = 1024**3


@dataclass(frozen=True)
class Chip:
    """One accelerator chip as its spec sheet gives it."""

    kind: str  # "v5e", "h100", ...
    platform: str  # "tpu" or "gpu"
    hbm_gib: float
    peak_bf16_flops: float  # dense, per chip
    hbm_bytes_per_s: float


CHIPS = {
    "v4": Chip("v4", "tpu", 32, 275e12, 1228e9),
    "v5e": Chip("v5e", "tpu", 16, 197e12, 819e9),
    "v5p": Chip("v5p", "tpu", 95, 459e12, 2765e9),
    "v6e": Chip("v6e", "tpu", 32, 918e12, 1640e9),
    "h100": Chip("h100", "gpu", 80e9 / GiB, 989e12, 3.35e12),
    "h200": Chip("h200", "gpu", 141e9 / GiB, 989e12, 4.8e12),
}


@dataclass(frozen=True)
class Target:
    """A slice of chips: `topology` is libtpu's ("v5e:2x4") or, for GPUs, "slices x hosts x gpus per host"."""

    name: str
    chip: Chip
    topology: str
    chips: int
    chips_per_host: tuple[int, int, int] = (2, 2, 1)
    chip_config: str = "default"  # TPU: "default" or "megacore" (v4 / v5p: two TensorCores as one device)
    slices: int = 1
    hbm_gib: float | None = None  # overrides the chip's (tests use a made-up small HBM)

    @property
    def platform(self) -> str:
        return self.chip.platform

    @property
    def hbm_bytes(self) -> float:
        return (self.hbm_gib if self.hbm_gib is not None else self.chip.hbm_gib) * GiB

    @property
    def devices_total(self) -> int:
        return self.chips * self.slices

    def describe(self) -> str:
        slices = f" x {self.slices} slices" if self.slices > 1 else ""
        return (f"{self.name}{slices}: {self.chips} {self.chip.kind} chip(s) ({self.topology}), "
                f"{self.hbm_bytes / GiB:.1f} GiB HBM, {self.chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16, "
                f"{self.chip.hbm_bytes_per_s / 1e9:.0f} GB/s each")


def _tpu(name, topology, chips, per_host=(2, 2, 1), config="default"):
    return Target(name, CHIPS[name.split("-")[0]], topology, chips, per_host, config)


TARGETS: dict[str, Target] = {t.name: t for t in [
    _tpu("v4-8", "v4:2x2x1", 4, config="megacore"),
    _tpu("v4-16", "v4:2x2x2", 8, config="megacore"),
    _tpu("v5e-1", "v5e:1x1", 1, (1, 1, 1)),
    _tpu("v5e-4", "v5e:2x2", 4),
    _tpu("v5e-8", "v5e:2x4", 8, (2, 4, 1)),
    _tpu("v5e-16", "v5e:4x4", 16),
    _tpu("v5p-8", "v5p:2x2x1", 4, config="megacore"),
    _tpu("v5p-16", "v5p:2x2x2", 8, config="megacore"),
    _tpu("v5p-64", "v5p:2x4x4", 32, config="megacore"),
    _tpu("v6e-1", "v6e:1x1", 1, (1, 1, 1)),
    _tpu("v6e-4", "v6e:2x2", 4),
    _tpu("v6e-8", "v6e:2x4", 8, (2, 4, 1)),
    _tpu("v6e-16", "v6e:4x4", 16),
    Target("h100", CHIPS["h100"], "1x1x1", 1, (1, 1, 1), "h100"),
    Target("h100-8", CHIPS["h100"], "1x1x8", 8, (8, 1, 1), "h100"),
    Target("h200", CHIPS["h200"], "1x1x1", 1, (1, 1, 1), "h200"),
    Target("h200-8", CHIPS["h200"], "1x1x8", 8, (8, 1, 1), "h200"),
]}


def get_target(name: str, *, slices: int = 1, hbm_gib: float | None = None) -> Target:
    """A named target, optionally over several slices (joined by the data-center network) or with another HBM.

    Args:
        name: one of `TARGETS` ("v5e-8", "v5p-64", "h100-8", ...).
        slices: how many such slices (multi-slice: the mesh's data axis spans them).
        hbm_gib: the HBM per chip to plan against instead of the spec sheet's.

    Example:
        >>> get_target("v5p-8").chips
        4
    """
    if name not in TARGETS:
        raise UsageError(f"unknown target {name!r}; targets: {', '.join(TARGETS)}")
    if slices < 1:
        raise UsageError(f"slices must be >= 1, got {slices}")
    target = TARGETS[name]
    if target.platform == "gpu" and slices > 1:
        target = dataclasses.replace(target, topology=f"{slices}x{target.topology.split('x', 1)[1]}")
    return dataclasses.replace(target, slices=slices, hbm_gib=hbm_gib)


def gpu_target_config(kind: str) -> str:
    """The XLA GpuTargetConfig (text proto) kept for GPU kind `kind` ("h100", "h200")."""
    return resources.files("pe_jax.assets").joinpath(f"gpu-target-{kind}.pbtxt").read_text()


def devices(target: Target) -> list:
    """Compile-only devices of `target`'s compiler, in the topology's order (no accelerator is touched).

    Needs JAX_PLATFORMS=cpu for GPU targets (the CUDA plugin then skips its hardware check); TPU targets need
    libtpu and skip the cloud metadata query (TPU_SKIP_MDS_QUERY=1, set here).
    """
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    from jax.experimental import topologies

    try:
        if target.platform == "tpu":
            topo = topologies.get_topology_desc(
                topology_name=target.topology.replace("v5p:", "v5:"), platform="tpu",
                chip_config_name=target.chip_config, chips_per_host_bounds=target.chips_per_host,
                num_slices=target.slices)
        else:
            topo = topologies.get_topology_desc(platform="cuda", topology=target.topology,
                                                target_config=gpu_target_config(target.chip_config))
    except Exception as e:  # the plugins say "not installed" / "not implemented" in many words
        raise MissingDependency(_missing_compiler(target, e)) from None
    return list(topo.devices)


def _missing_compiler(target: Target, error: Exception) -> str:
    if target.platform == "tpu":
        package = 'pip install "jax[tpu]" (libtpu; in a checkout: pip install -e ".[tpu]")'
    else:
        package = ('pip install "jax[cuda12]" (the CUDA plugin; in a checkout: pip install -e ".[cuda]") and run '
                   "with JAX_PLATFORMS=cpu")
    return f"cannot compile for {target.name} here: {package}. ({str(error).splitlines()[0][:200]})"


def make_mesh(target: Target, axes: str | dict | None = None):
    """A mesh of pe_jax's axes (data, fsdp, model) over `target`'s devices, laid onto the physical topology.

    Each mesh axis takes whole physical axes where it can (XLA's device-mesh tactic; split physical axes
    are allowed, so fsdp=8 fits a 4x4 slice); with several slices the data axis spans them (the slow
    network carries only the data-parallel gradient reduction). Default: every chip on `fsdp`.

    Example:
        >>> mesh = make_mesh(get_target("v5e-4"), "fsdp=2,model=2")  # doctest: +SKIP
    """
    import numpy as np
    from jax.experimental import mesh_utils
    from jax.sharding import AxisType, Mesh

    from pe_jax.sharding import MESH_AXES, parse_mesh

    sizes = parse_mesh(axes) if isinstance(axes, str) else dict(axes or {"fsdp": target.devices_total})
    shape = [sizes.get(a, 1) for a in MESH_AXES]
    if -1 in shape:
        rest = math.prod(s for s in shape if s != -1)
        shape[shape.index(-1)] = target.devices_total // max(rest, 1)
    if math.prod(shape) != target.devices_total:
        raise UsageError(f"mesh {axes} has {math.prod(shape)} devices; {target.name}"
                         f"{f' x {target.slices}' if target.slices > 1 else ''} has {target.devices_total}")
    devs = devices(target)
    if target.slices > 1:
        per_slice = [shape[0] // target.slices if shape[0] % target.slices == 0 else None, *shape[1:]]
        if per_slice[0] is None:
            raise UsageError(f"the data axis ({shape[0]}) must be a multiple of the {target.slices} slices")
        grid = mesh_utils.create_hybrid_device_mesh(per_slice, [target.slices, 1, 1], devs,
                                                    allow_split_physical_axes=True)
    elif target.platform == "tpu":
        grid = mesh_utils.create_device_mesh(shape, devs, allow_split_physical_axes=True)
    else:
        grid = np.asarray(devs).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
