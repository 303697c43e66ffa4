"""Bundle build and verify cost, as ratios measured in one run (never fails on time).

    .venv/bin/python tests/bench/bench_bundle.py

Inputs: the torch CPU wheel and its dependencies from the test wheelhouse (`make venv`), and a
model directory with the tiny model's files plus a 512 MiB synthetic safetensors shard (split at
the default 3.9 GiB: not split). Everything is read from the page cache (warmed first), so the
ratios compare our work with `sha256sum`'s, not disk speed.

1. build: input bytes per second of `airlock-bundle build` (pip resolution, copy, hash, SBOM,
   sign) vs `sha256sum` over the same input files. Goal: >= 0.8x.
2. verify: `airlock-bundle verify` (signature, walk, hash every file) vs `sha256sum` over the
   bundle's files. Goal: >= 0.8x.
3. size: bundle bytes vs the sum of the inputs (the manifest, signature, SBOM and lock overhead).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.bundler.bundles import TINY_MODEL, WHEELHOUSE, bundle_env, make_key, write_spec  # noqa: E402

BIN = Path(sys.executable).parent
SHARD_MIB = 512


def _sha256sum_seconds(files: list[Path]) -> float:
    start = time.perf_counter()
    subprocess.run(["sha256sum", *map(str, files)], check=True, capture_output=True)
    return time.perf_counter() - start


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def main() -> None:
    if not any(WHEELHOUSE.glob("torch-*.whl")):
        sys.exit(f"{WHEELHOUSE} has no torch wheel: run `make venv` first")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = tmp / "model"
        shutil.copytree(TINY_MODEL, model)
        with (model / "model-00002-of-00002.safetensors").open("wb") as handle:
            for _ in range(SHARD_MIB):
                handle.write(os.urandom(2**20))
        key, _ = make_key(tmp / "key")
        spec = write_spec(tmp / "spec.toml", requirements=("torch==2.13.0+cpu",), model=model)
        # The inputs the bundle ships: the wheels pip resolves for torch, and the model files.
        probe = subprocess.run([str(BIN / "airlock-bundle"), "build", str(spec), "--key", str(key), "--out",
                                str(tmp / "probe")], env=bundle_env(), check=True, capture_output=True)
        del probe
        wheel_names = [p.name for p in (tmp / "probe" / "wheels").glob("*.whl")]
        inputs = [WHEELHOUSE / name for name in wheel_names] + _files(model)
        input_bytes = sum(p.stat().st_size for p in inputs)
        shutil.rmtree(tmp / "probe")
        _sha256sum_seconds(inputs)  # warm the page cache

        baseline_build = _sha256sum_seconds(inputs)
        start = time.perf_counter()
        subprocess.run([str(BIN / "airlock-bundle"), "build", str(spec), "--key", str(key), "--out",
                        str(tmp / "bundle")], env=bundle_env(), check=True, capture_output=True)
        build_seconds = time.perf_counter() - start

        bundle_files = _files(tmp / "bundle")
        bundle_bytes = sum(p.stat().st_size for p in bundle_files)
        baseline_verify = _sha256sum_seconds(bundle_files)
        start = time.perf_counter()
        subprocess.run([str(BIN / "airlock-bundle"), "verify", str(tmp / "bundle"), "--trust",
                        str(key.parent / "signing-key.pub.pem")], env=bundle_env(), check=True, capture_output=True)
        verify_seconds = time.perf_counter() - start

    mib = 2**20
    print(f"inputs: {len(inputs)} files, {input_bytes / mib:.0f} MiB; bundle: {len(bundle_files)} files, "
          f"{bundle_bytes / mib:.0f} MiB")
    print(f"build : {input_bytes / mib / build_seconds:7.0f} MiB/s  vs sha256sum "
          f"{input_bytes / mib / baseline_build:7.0f} MiB/s  ratio {baseline_build / build_seconds:.2f}x  "
          "(goal >= 0.8x)")
    print(f"verify: {bundle_bytes / mib / verify_seconds:7.0f} MiB/s  vs sha256sum "
          f"{bundle_bytes / mib / baseline_verify:7.0f} MiB/s  ratio {baseline_verify / verify_seconds:.2f}x  "
          "(goal >= 0.8x)")
    print(f"size  : bundle / inputs = {bundle_bytes / input_bytes:.4f} (+{bundle_bytes - input_bytes} bytes: "
          "install.sh, manifest, signature, key, SBOM, lock)")


if __name__ == "__main__":
    main()
