"""The dashboard's torch-free GPU line: nvidia-smi's CSV when it answers, "CPU only" when it is missing or fails.

The nvidia-smi here is a stand-in script on PATH (an external tool, not our code) printing what the real
one prints for `--query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv,noheader,nounits`."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from appliance.gpu_probe import gpu_summary, gpus


def fake_smi(folder: Path, body: str) -> None:
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_two_gpus_with_memory_and_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fake_smi(tmp_path, "printf 'NVIDIA H100 80GB HBM3, 1024, 81559, 3\\nNVIDIA H100 80GB HBM3, [N/A], 81559, 97\\n'")
    monkeypatch.setenv("PATH", str(tmp_path))
    found = gpus()
    assert found is not None and [g.name for g in found] == ["NVIDIA H100 80GB HBM3"] * 2
    assert found[0].memory_used_mib == 1024 and found[1].memory_used_mib is None
    assert gpu_summary() == ("0: NVIDIA H100 80GB HBM3, 1.0/79.6 GiB, 3% busy; "
                             "1: NVIDIA H100 80GB HBM3, memory ?, 97% busy")


def test_no_nvidia_smi_or_a_failing_one_is_cpu_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpus() is None and gpu_summary().startswith("CPU only")
    fake_smi(tmp_path, "echo 'NVIDIA-SMI has failed because it could not communicate with the driver' >&2; exit 9")
    assert gpus() is None and gpu_summary().startswith("CPU only")
