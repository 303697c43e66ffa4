"""Bundle build and verify cost, as ratios measured in one run (never fails on time).

    .venv/bin/python tests/bench/bench_bundle.py

Inputs: the torch CPU wheel and its dependencies from the test wheelhouse (`make venv`), and a
model directory with the tiny model's files plus a 512 MiB synthetic safetensors shard (split at
the default 3.9 GiB: not split). Everything is read from the page cache (warmed first), so the
ratios compare our work with `sha256sum`'s, not disk speed.

1. build: input bytes per second of `airlock-bundle build` (pip resolution, copy, hash, SBOM,
   sign) vs `sha256sum` over the same input files. Goal: >= 0.8x. The build reads each input
   byte once (hashing while it copies, several files at once: ADR 0018); it used to read a
   wheel three times (pip's copy, the lock's hash, the manifest's hash).
2. verify: `airlock-bundle verify` (signature, walk, hash every file) vs `sha256sum` over the
   bundle's files. Goal: >= 0.8x.
3. size: bundle bytes vs the sum of the inputs (the manifest, signature, SBOM and lock overhead).

Each line also gives the CPU seconds (user + system, children included) of both sides: on a
shared machine wall time depends on the neighbours, CPU time much less. coreutils' sha256sum
may hash without the SHA extensions that OpenSSL (Python's hashlib) uses (Debian's 9.1 does: 8x
slower than OpenSSL on the build machine), which flatters every ratio against it; the `openssl`
line compares the build with `openssl dgst -sha256` over the same inputs, a hasher as fast as ours.
"""

from __future__ import annotations

import os
import resource
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


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(command: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and its children)."""
    cpu, start = _children_cpu(), time.perf_counter()
    subprocess.run(command, env=bundle_env(), check=True, capture_output=True)
    return time.perf_counter() - start, _children_cpu() - cpu


def _sha256sum_seconds(files: list[Path]) -> tuple[float, float]:
    return _timed(["sha256sum", *map(str, files)])


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

        baseline_build, baseline_build_cpu = _sha256sum_seconds(inputs)
        openssl_build, openssl_build_cpu = _timed(["openssl", "dgst", "-sha256", *map(str, inputs)])
        build_seconds, build_cpu = _timed([str(BIN / "airlock-bundle"), "build", str(spec), "--key", str(key),
                                           "--out", str(tmp / "bundle")])

        bundle_files = _files(tmp / "bundle")
        bundle_bytes = sum(p.stat().st_size for p in bundle_files)
        baseline_verify, baseline_verify_cpu = _sha256sum_seconds(bundle_files)
        verify_seconds, verify_cpu = _timed([str(BIN / "airlock-bundle"), "verify", str(tmp / "bundle"), "--trust",
                                             str(key.parent / "signing-key.pub.pem")])

    mib = 2**20
    print(f"inputs: {len(inputs)} files, {input_bytes / mib:.0f} MiB; bundle: {len(bundle_files)} files, "
          f"{bundle_bytes / mib:.0f} MiB")
    print(f"build : {input_bytes / mib / build_seconds:7.0f} MiB/s  vs sha256sum "
          f"{input_bytes / mib / baseline_build:7.0f} MiB/s  ratio {baseline_build / build_seconds:.2f}x  "
          f"(goal >= 0.8x); CPU {build_cpu:.2f} s vs {baseline_build_cpu:.2f} s, ratio "
          f"{baseline_build_cpu / build_cpu:.2f}x")
    print(f"openssl: build vs `openssl dgst -sha256` {input_bytes / mib / openssl_build:7.0f} MiB/s  ratio "
          f"{openssl_build / build_seconds:.2f}x; CPU {build_cpu:.2f} s vs {openssl_build_cpu:.2f} s, ratio "
          f"{openssl_build_cpu / build_cpu:.2f}x")
    print(f"verify: {bundle_bytes / mib / verify_seconds:7.0f} MiB/s  vs sha256sum "
          f"{bundle_bytes / mib / baseline_verify:7.0f} MiB/s  ratio {baseline_verify / verify_seconds:.2f}x  "
          f"(goal >= 0.8x); CPU {verify_cpu:.2f} s vs {baseline_verify_cpu:.2f} s, ratio "
          f"{baseline_verify_cpu / verify_cpu:.2f}x")
    print(f"size  : bundle / inputs = {bundle_bytes / input_bytes:.4f} (+{bundle_bytes - input_bytes} bytes: "
          "install.sh, manifest, signature, key, SBOM, lock)")


if __name__ == "__main__":
    main()
