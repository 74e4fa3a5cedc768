"""What an accelerator can do, as the roofline model and MFU need it: peak FLOP/s per dtype, memory, and
the bandwidths of its memory and of its links inside and between nodes.

Figures are the vendors' dense (no sparsity) peaks for the SXM/OAM parts; links are per GPU and per
direction (NVLink 4 on H100: 900 GB/s both ways, so 450; one 400 Gb/s NIC per GPU: 50 GB/s). MFU is
reported against these peaks, as PaLM and Megatron-LM do, so a figure is comparable across engines; a
``measured`` spec (:func:`measure_local_device`) reports against what this machine's own matmul reaches,
which is the honest denominator on hardware the table does not know (CPUs, a power-capped card).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

__all__ = ["DEVICES", "DeviceSpec", "device_spec", "host_spec", "measure_local_device", "spec_for_local_device"]

_T = 1e12
_G = 1e9


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator. ``peak_flops`` maps a dtype name (``bfloat16``, ``float16``, ``float32``) to dense
    FLOP/s; ``intra_node_bw`` / ``inter_node_bw`` are bytes/s per device and direction."""

    name: str
    memory_bytes: int
    peak_flops: dict[str, float] = field(default_factory=dict)
    memory_bw: float = 0.0
    intra_node_bw: float = 0.0
    inter_node_bw: float = 0.0
    gpus_per_node: int = 8
    measured: bool = False  # the peaks come from timing this machine, not from the table

    def flops(self, dtype: torch.dtype | str) -> float:
        """Peak FLOP/s for ``dtype``; float32 falls back to the table's TF32 entry when that is all it has."""
        key = str(dtype).removeprefix("torch.")
        if key in self.peak_flops:
            return self.peak_flops[key]
        raise KeyError(f"device {self.name!r} has no peak FLOP/s for {key} (known: {sorted(self.peak_flops)})")


def _gpu(name: str, gb: float, bf16: float, fp32: float, hbm: float, nvlink: float, nic: float) -> DeviceSpec:
    return DeviceSpec(
        name=name,
        memory_bytes=int(gb * _G),
        peak_flops={"bfloat16": bf16 * _T, "float16": bf16 * _T, "float32": fp32 * _T},
        memory_bw=hbm * 1e12,
        intra_node_bw=nvlink * _G,
        inter_node_bw=nic * _G,
    )


# fp32 is the TF32 tensor-core peak (what PyTorch matmuls reach with allow_tf32), except on cards without it.
DEVICES: dict[str, DeviceSpec] = {
    spec.name: spec
    for spec in (
        _gpu("h100", 80, 989, 494, 3.35, 450, 50),
        _gpu("h200", 141, 989, 494, 4.8, 450, 50),
        _gpu("a100", 80, 312, 156, 2.04, 300, 25),
        _gpu("a100-40gb", 40, 312, 156, 1.56, 300, 25),
        _gpu("l40s", 48, 362, 183, 0.864, 32, 25),
        _gpu("mi300x", 192, 1307, 654, 5.3, 448, 50),
        _gpu("v100", 32, 125, 15.7, 0.9, 150, 12.5),
    )
}


def device_spec(name: str) -> DeviceSpec:
    """The table's entry for ``name`` (``h100``, ``a100``, ...; case and an ``nvidia-`` prefix ignored)."""
    key = name.lower().removeprefix("nvidia-").removeprefix("nvidia ").replace(" ", "-")
    if key not in DEVICES:
        raise KeyError(f"unknown device {name!r}; known: {', '.join(sorted(DEVICES))}")
    return DEVICES[key]


def spec_for_local_device(device: torch.device | None = None) -> DeviceSpec | None:
    """The table's entry for the local GPU when its name is in the table (``NVIDIA H100 80GB HBM3`` ->
    ``h100``), None on CPUs and unknown cards (then only a measured peak gives an MFU)."""
    device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    for key in sorted(DEVICES, key=len, reverse=True):  # "a100-40gb" before "a100"
        token = key.split("-")[0]
        if token in name and (key == token or "40gb" in name):
            return DEVICES[key]
    return None


def host_spec() -> DeviceSpec:
    """This machine's CPU as a device with its RAM and no peak FLOP/s: plans on it size memory and
    communication but predict no step time (``measure_local_device`` gives one a peak). Its memory is the
    whole RAM, which every rank on the host shares."""
    import os

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    # Every rank of a CPU run shares this host, so all its groups use the intra-node "link".
    return DeviceSpec(name="cpu", memory_bytes=int(memory), gpus_per_node=os.cpu_count() or 1)


def _timed_matmul_flops(device: torch.device, dtype: torch.dtype, size: int, seconds: float) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up: kernels chosen, memory allocated
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    runs, start = 0, time.perf_counter()
    while True:
        torch.matmul(a, b)
        runs += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2 * size**3 * runs / elapsed


def measure_local_device(
    device: torch.device | None = None,
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16),
    *,
    size: int | None = None,
    seconds: float = 0.5,
) -> DeviceSpec:
    """A spec whose peaks are what a square matmul reaches here (``measured=True``), for MFU on devices
    the table does not know. Bandwidths and memory come from the table entry when there is one."""
    device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    size = size or (8192 if device.type == "cuda" else 512)
    peaks = {str(dt).removeprefix("torch."): _timed_matmul_flops(device, dt, size, seconds) for dt in dtypes}
    if "bfloat16" in peaks and "float16" not in peaks:
        peaks["float16"] = peaks["bfloat16"]
    known = spec_for_local_device(device)
    if known is not None:
        return replace(known, name=f"{known.name} (measured)", peak_flops=peaks, measured=True)
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
        return DeviceSpec(name="cuda (measured)", memory_bytes=memory, peak_flops=peaks, measured=True)
    return replace(host_spec(), name="cpu (measured)", peak_flops=peaks, measured=True)
