"""GPUs as the dashboard shows them, without importing torch: `nvidia-smi` when it is there, else "CPU only".

    gpus()        -> [GpuState]   name, memory used/total (MiB), utilization (%)
    gpu_summary() -> str          "NVIDIA H100 80GB: 1.2/80.0 GiB, 3% busy" per GPU, or "CPU only: ..."

Cheap enough to poll (one short subprocess); `airlock doctor` keeps the thorough check through torch.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

QUERY = "name,memory.used,memory.total,utilization.gpu"
TIMEOUT_S = 5


@dataclass(frozen=True)
class GpuState:
    index: int
    name: str
    memory_used_mib: float | None
    memory_total_mib: float | None
    utilization_pct: float | None


def _number(text: str) -> float | None:
    try:
        return float(text.strip())
    except ValueError:  # "[N/A]" on some boards
        return None


def gpus() -> list[GpuState] | None:
    """The GPUs nvidia-smi reports; None when there is no nvidia-smi or it fails (no driver)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        result = subprocess.run([smi, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits"], capture_output=True,
                                text=True, timeout=TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    found = []
    for index, line in enumerate(result.stdout.strip().splitlines()):
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4:
            found.append(GpuState(index, parts[0], _number(parts[1]), _number(parts[2]), _number(parts[3])))
    return found


def gpu_summary() -> str:
    found = gpus()
    if found is None:
        return "CPU only: no NVIDIA driver (nvidia-smi not found or failing)"
    if not found:
        return "CPU only: nvidia-smi lists no GPU"
    parts = []
    for gpu in found:
        memory = (f"{gpu.memory_used_mib / 1024:.1f}/{gpu.memory_total_mib / 1024:.1f} GiB"
                  if gpu.memory_used_mib is not None and gpu.memory_total_mib else "memory ?")
        busy = f"{gpu.utilization_pct:.0f}% busy" if gpu.utilization_pct is not None else "load ?"
        parts.append(f"{gpu.index}: {gpu.name}, {memory}, {busy}")
    return "; ".join(parts)
