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


def flip_bit(path: Path) -> bytes:
    """Flip one bit in the middle of `path` (a file altered on disk); returns the original bytes."""
    original = path.read_bytes()
    changed = bytearray(original)
    changed[len(changed) // 2] ^= 0x01
    path.write_bytes(bytes(changed))
    return original


def resign(bundle: Path, key: Path, manifest: dict) -> None:
    """Write `manifest` (canonical) and a valid signature by `key`: for cases a signer could produce."""
    from bundler.manifest import canonical_json
    from bundler.signing import load_private_key, sign

    data = canonical_json(manifest)
    (bundle / "MANIFEST.json").write_bytes(data)
    (bundle / "MANIFEST.json.sig").write_bytes(sign(load_private_key(key, PASSPHRASE.encode()), data))


# The code-only change of the differential v2 in `release_bundles`: one line appended to a module the
# installed `airlock doctor` imports.
CHANGED_MODULE = "appliance/doctor.py"
CHANGED_MARKER = "# differential-bundle test: the v2 code change\n"


def release_bundles(root: Path) -> dict:
    """The signed releases the install tests use, built once (tests/conftest.py's `release_bundles` fixture):
    a full bundle of the appliance with its pinned CPU stack (v1), a differential v2 over it whose only change is
    one line of the appliance's code, a differential over another base (`wrong`), a bundle of another product,
    one without the appliance (its smoke test fails), and two signed by a new key, with and without a rotation
    statement from the trusted key."""
    from bundler.wheels import BUILD_STATE

    require_wheelhouse("torch-2.13.0*.whl", "onnxruntime-1.32.0-*.whl", "mdurl-0.1.2-*.whl")
    key, fingerprint = make_key(root / "key")
    v1 = build(write_spec(root / "v1.toml", version="0.1.0", sequence=1, requirements=(), project=True),
               key, root / "airlock-0.1.0")
    changed = root / "source-v2" / REPO.name
    shutil.copytree(REPO, changed, symlinks=True, ignore=shutil.ignore_patterns(*BUILD_STATE))
    with (changed / CHANGED_MODULE).open("a", encoding="utf-8") as handle:
        handle.write(CHANGED_MARKER)
    v2 = build(write_spec(root / "v2.toml", version="0.2.0", sequence=2, requirements=(), project=True,
                          project_path=changed), key, root / "airlock-0.2.0-diff", "--differential-from", str(v1))
    # A differential over some other release of the product: the wrong base for an install of v1.
    other_base = build(write_spec(root / "base.toml", version="0.0.9", sequence=1), key, root / "airlock-0.0.9")
    wrong = build(write_spec(root / "wrong.toml", version="0.3.0", sequence=3), key, root / "airlock-0.3.0-diff",
                  "--differential-from", str(other_base))
    other = build(write_spec(root / "other.toml", product="other-product", version="9.0.0", sequence=9),
                  key, root / "other-9.0.0")
    # Signed and intact, but without the appliance: its smoke test (`airlock doctor`) must fail.
    no_app = build(write_spec(root / "no-app.toml", version="0.5.0", sequence=5), key, root / "airlock-0.5.0")
    new_key, _ = make_key(root / "new-key")
    rotated = build(write_spec(root / "rotated.toml", version="0.6.0", sequence=6), new_key, root / "rotated",
                    "--rotate-from", str(key))
    unvouched = build(write_spec(root / "unvouched.toml", version="0.7.0", sequence=7), new_key, root / "unvouched")
    return {"fp": fingerprint, "key": key, "v1": v1, "v2": v2, "wrong": wrong, "other": other, "no_app": no_app,
            "rotated": rotated, "unvouched": unvouched, "root": root}
