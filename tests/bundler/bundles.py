"""Helpers shared by the bundle tests: real keys, real specs, real `airlock-bundle build` runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO

PASSPHRASE = "correct horse battery staple"
# Filled by `make venv` (see the Makefile): the e2e and tamper bundles are built from it offline.
WHEELHOUSE = REPO / ".cache" / "wheelhouse"
TINY_MODEL = REPO / "models" / "tiny-deepseek-r1"
# Small enough that the tiny model's 10 MB safetensors ships as three parts.
SPLIT_BYTES = 4_000_000


def bundle_env() -> dict[str, str]:
    return {**os.environ, "AIRLOCK_SIGNING_PASSPHRASE": PASSPHRASE, "AIRLOCK_OLD_SIGNING_PASSPHRASE": PASSPHRASE,
            "PIP_CONFIG_FILE": os.devnull}


def run_bundler(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "airlock-bundle"), *args], capture_output=True, text=True, timeout=timeout,
                          env=bundle_env(), check=False, cwd=REPO)


def require_wheelhouse(*names: str) -> None:
    for name in names:
        if not any(WHEELHOUSE.glob(name)):
            pytest.fail(f"{WHEELHOUSE} lacks {name}: run `make venv`, which fills the test wheelhouse")


def make_key(directory: Path) -> tuple[Path, str]:
    """(private key path, fingerprint) from a real `airlock-bundle keygen`."""
    result = run_bundler("keygen", "--out", str(directory))
    assert result.returncode == 0, result.stderr
    fingerprint = result.stdout.strip().splitlines()[-1].split()[-1]
    return directory / "signing-key.pem", fingerprint


def write_spec(path: Path, *, version: str = "0.1.0", sequence: int = 1, product: str = "airlock",
               requirements: tuple[str, ...] = ("mdurl==0.1.2",), project: bool = False, extras: str = "appliance",
               model: Path = TINY_MODEL, platform: str = "manylinux_2_28_x86_64", expires: str = "2099-12-31",
               find_links: Path = WHEELHOUSE, project_path: Path = REPO, cuda_major: int = 0,
               min_compute_capability: str = "") -> Path:
    lines = [f'product = "{product}"', f'version = "{version}"', f"sequence = {sequence}", f"expires = {expires}",
             "[target]", 'python = "3.11"', f'platform = "{platform}"', f"cuda_major = {cuda_major}",
             *([f'min_compute_capability = "{min_compute_capability}"'] if min_compute_capability else []),
             "[wheels]", f"requirements = {json.dumps(list(requirements))}",
             f"find_links = [{json.dumps(str(find_links))}]", "index = false"]
    if project:
        lines += ["[project]", f"path = {json.dumps(str(project_path))}",
                  f"extras = {json.dumps([extras] if extras else [])}"]
    lines += ["[[models]]", 'name = "tiny-deepseek-r1"', f"path = {json.dumps(str(model))}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def build(spec: Path, key: Path, out: Path, *extra: str) -> Path:
    result = run_bundler("build", str(spec), "--key", str(key), "--out", str(out), "--split-size", str(SPLIT_BYTES),
                         *extra)
    assert result.returncode == 0, result.stderr
    return out


def copy_bundle(bundle: Path, dest: Path) -> Path:
    shutil.copytree(bundle, dest, symlinks=True)
    return dest


def manifest_of(bundle: Path) -> dict:
    return json.loads((bundle / "MANIFEST.json").read_bytes())


def resign(bundle: Path, key: Path, manifest: dict) -> None:
    """Write `manifest` (canonical) and a valid signature by `key`: for cases a signer could produce."""
    from bundler.manifest import canonical_json
    from bundler.signing import load_private_key, sign

    data = canonical_json(manifest)
    (bundle / "MANIFEST.json").write_bytes(data)
    (bundle / "MANIFEST.json.sig").write_bytes(sign(load_private_key(key, PASSPHRASE.encode()), data))
