"""install.sh's preflight for GPU bundles: driver vs the bundle's CUDA major, each GPU's compute
capability vs the oldest the wheels support, free space for staging plus install.

The real install.sh runs with `--preflight-only` (verify, print the table, write nothing) on a
small signed CUDA 12 bundle; `nvidia-smi` is an executable first on PATH that prints saved
output of real cards (tests/bundler/data/nvidia-smi/, see its README) or fails as the real one
does without a driver. Free space is checked on a 2 MiB tmpfs in a private mount namespace.
A real GPU is not needed: the decisions are the script's arithmetic on nvidia-smi's text.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.bundler.bundles import build, make_key, manifest_of, require_wheelhouse, write_spec
from tests.conftest import unshare_available

DATA = Path(__file__).parent / "data" / "nvidia-smi"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict:
    require_wheelhouse("mdurl-0.1.2-*.whl")
    root = tmp_path_factory.mktemp("gpu-preflight")
    key, fingerprint = make_key(root / "key")
    cuda = build(write_spec(root / "cuda.toml", cuda_major=12, min_compute_capability="7.5"), key, root / "cuda12")
    cpu = build(write_spec(root / "cpu.toml"), key, root / "cpu")
    return {"fp": fingerprint, "cuda": cuda, "cpu": cpu, "root": root}


def fake_nvidia_smi(directory: Path, sample: str | None) -> Path:
    """An `nvidia-smi` that answers like the real one on the machine `sample` was taken from."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "nvidia-smi"
    if sample == "no-driver.txt":
        body = f'cat "{DATA / sample}"\nexit 9\n'
    elif sample is not None:
        # Drivers before 510 do not know compute_cap; these samples are all newer, so every field answers.
        body = (f'case "$*" in *compute_cap*) cat "{DATA / sample}" ;;\n'
                f'  *) cut -d, -f1,2 "{DATA / sample}" ;; esac\n')
    else:
        body = "exit 127\n"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return directory


def preflight(bundle: Path, fingerprint: str, prefix: Path, home: Path, path_dir: Path | None,
              wrap: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{path_dir}:{os.environ['PATH']}" if path_dir else os.environ["PATH"]}
    command = ["sh", str(bundle / "install.sh"), "--trust", fingerprint, "--prefix", str(prefix), "--home", str(home),
               "--preflight-only"]
    return subprocess.run([*(wrap or []), *command], capture_output=True, text=True, timeout=120, check=False,
                          env=env)


def rows(output: str) -> dict[str, str]:
    """check name -> the rest of its row in the preflight table."""
    table = {}
    for line in output.splitlines():
        match = re.match(r"^(nvidia driver|gpu \d+|free space)\s+(.*)$", line)
        if match:
            table.setdefault(match.group(1), match.group(2))
    return table


@pytest.mark.parametrize(("sample", "driver", "gpus", "refusal"), [
    ("h100.csv", "560.35.03 ok", ["NVIDIA H100 80GB HBM3 (sm 9.0) ok"], None),
    ("rtx4090-h100.csv", "550.54.15 ok", ["NVIDIA GeForce RTX 4090 (sm 8.9) ok", "NVIDIA H100 80GB HBM3 (sm 9.0) ok"],
     None),
    # Volta: the driver is fine, the card is older than the wheels (and TensorRT 10) support.
    ("v100.csv", "535.183.01 ok", ["Tesla V100-SXM2-32GB (sm 7.0) FAIL"],
     "preflight: gpu 0: needs sm >= 7.5 (wheels, TensorRT), found Tesla V100-SXM2-32GB (sm 7.0)"),
    # A Turing card the wheels support, on a driver too old for CUDA 12.
    ("t4-driver-470.csv", "470.182.03 FAIL", ["Tesla T4 (sm 7.5) ok"],
     "preflight: nvidia driver: needs >= 525 (CUDA 12), found 470.182.03"),
    # No driver loaded (nvidia-smi fails) or no nvidia-smi at all: a notice, the bundle runs on the CPU.
    ("no-driver.txt", "no NVIDIA GPU/driver: runs CPU-only notice", [], None),
    (None, "no NVIDIA GPU/driver: runs CPU-only notice", [], None),
], ids=["h100", "rtx4090+h100", "v100", "t4-old-driver", "no-driver", "no-nvidia-smi"])
def test_gpu_rows_of_the_preflight(bundles, tmp_path, sample, driver, gpus, refusal):
    path_dir = fake_nvidia_smi(tmp_path / "bin", sample)
    prefix, home = tmp_path / "prefix", tmp_path / "home"
    result = preflight(bundles["cuda"], bundles["fp"], prefix, home, path_dir)
    output = result.stdout + result.stderr
    table = rows(result.stdout)
    assert re.sub(r"\s+", " ", table["nvidia driver"]).endswith(driver), output
    assert [re.sub(r"\s+", " ", table.get(f"gpu {i}", "")) for i in range(len(gpus))] == [
        "sm >= 7.5 (wheels, TensorRT) " + g for g in gpus], output
    assert "gpu " + str(len(gpus)) not in table
    if refusal is None:
        assert result.returncode == 0, output
        assert "preflight passed (--preflight-only: nothing written)" in result.stdout, output
    else:
        assert result.returncode == 1 and result.stderr.splitlines() == [f"install.sh: REFUSED: {refusal}"], output
    assert not prefix.exists() and not home.exists()  # nothing written either way


def test_a_cpu_bundle_asks_no_driver(bundles, tmp_path):
    path_dir = fake_nvidia_smi(tmp_path / "bin", "v100.csv")  # a GPU that a CUDA bundle would refuse
    result = preflight(bundles["cpu"], bundles["fp"], tmp_path / "prefix", tmp_path / "home", path_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.sub(r"\s+", " ", rows(result.stdout)["nvidia driver"]) == "none (CPU bundle) - ok"
    assert "gpu 0" not in rows(result.stdout)


def _needs_kib(manifest: dict) -> tuple[int, int]:
    """(PREFIX, HOME) KiB by the rule install.sh states: staging + 4x the wheels + the largest split file;
    the model files once."""
    files = manifest["files"]
    wheels = sum(f["size"] for f in files if re.match(r"wheels/.*\.whl", f["path"]))
    split = max([s["size"] for s in manifest["split_files"]] or [0])
    prefix = (sum(f["size"] for f in files) + 4 * wheels) // 1024 + 1 + split // 1024
    home = sum(f["size"] for f in files if f["path"].startswith("models/")) // 1024 + 1
    return prefix, home


@pytest.mark.skipif(not unshare_available() or os.geteuid() != 0,
                    reason="mounts a small tmpfs in a private mount namespace (root)")
def test_free_space_counts_staging_and_install_per_filesystem(bundles, tmp_path):
    prefix_kib, home_kib = _needs_kib(manifest_of(bundles["cuda"]))
    small = tmp_path / "small"
    small.mkdir()
    script = ('mount -t tmpfs -o size=2m tmpfs "$0" && exec "$@"')
    wrap = ["unshare", "-m", "sh", "-c", script, str(small)]
    # Prefix and home on the same 2 MiB filesystem: one row, the sum, refused.
    same = preflight(bundles["cuda"], bundles["fp"], small / "prefix", small / "home", None, wrap)
    need = (prefix_kib + home_kib) // 1024
    assert same.returncode == 1, same.stdout + same.stderr
    assert same.stderr.splitlines() == [
        f"install.sh: REFUSED: preflight: free space: needs >= {need} MiB (staging+install), found 2 MiB under "
        f"{small}/prefix and {small}/home"]
    # The home elsewhere: two rows; the prefix's (staging + venv) alone is refused.
    apart = preflight(bundles["cuda"], bundles["fp"], small / "prefix", tmp_path / "home", None, wrap)
    assert apart.returncode == 1
    assert f"free space: needs >= {prefix_kib // 1024} MiB (staging+venv), found 2 MiB under {small}/prefix" \
        in apart.stderr
    assert re.search(rf"free space\s+>= {home_kib // 1024} MiB \(models\)\s+\d+ MiB under {tmp_path}/home\s+ok",
                     apart.stdout), apart.stdout
    assert json.loads((bundles["cuda"] / "MANIFEST.json").read_bytes())["target"]["min_compute_capability"] == "7.5"


def _real_gpus() -> list[list[str]]:
    import shutil

    if shutil.which("nvidia-smi") is None:
        return []
    done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,compute_cap", "--format=csv,noheader"],
                          capture_output=True, text=True, check=False, timeout=60)
    return [[f.strip() for f in line.split(",")] for line in done.stdout.splitlines() if line.strip()] \
        if done.returncode == 0 else []


@pytest.mark.gpu
@pytest.mark.skipif(not _real_gpus(), reason="needs an NVIDIA GPU with its driver (the real nvidia-smi)")
def test_the_real_nvidia_smi_fills_the_gpu_rows(bundles, tmp_path):
    result = preflight(bundles["cuda"], bundles["fp"], tmp_path / "prefix", tmp_path / "home", None)
    table = rows(result.stdout)
    gpus = _real_gpus()
    assert gpus[0][1] in table["nvidia driver"], result.stdout
    for index, (name, _driver, cc) in enumerate(gpus):
        assert f"{name} (sm {cc})" in table[f"gpu {index}"], result.stdout
