"""`make gpu-bundle`: download, build, split, verify and install the CUDA 12 bundle on this host.

    .venv/bin/python tests/bundler/gpu_bundle.py [--work .cache/gpu] [--split-size BYTES] [--keep]

Not part of `make test` (it downloads about 4.3 GB from the public index and installs ~9 GB):
1. download: `pip download` of bundler/examples/cuda12.toml's wheels for its target (CPython 3.11,
   manylinux_2_28_x86_64), from the public index only, into WORK/wheels (files already there are
   kept: a rerun downloads nothing);
2. build: `airlock-bundle build` of that spec with pip pointed at WORK/wheels only (an air-gapped
   build station fed by step 1), files over --split-size (default 512 MiB, so that the multi-
   hundred-MB CUDA wheels are split and reassembled; the FAT32 default, 3.9 GiB, splits none);
3. verify: `airlock-bundle verify` against the key's fingerprint;
4. install: the bundle's install.sh under `unshare -n` into WORK/site (a fresh prefix and home),
   as root with a service account;
5. smoke test: the installed `airlock doctor --json` must show torch's CUDA 12 build and
   onnxruntime-gpu's CUDA provider, and the missing NVIDIA driver as a warning, not a failure.
Prints the numbers of the IT guide's sizing table; exits 1 at the first failed step (naming it).
The install is removed afterwards unless --keep; the bundle and downloads stay in WORK.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "bundler" / "examples" / "cuda12.toml"
BIN = Path(sys.executable).parent
PASSPHRASE = os.environ.get("AIRLOCK_SIGNING_PASSPHRASE", "correct horse battery staple")
SERVICE_USER = "airlock-gpu-test"


def step(name: str, command: list[str], env: dict[str, str] | None = None, **kwargs) -> tuple[float, str]:
    print(f"== {name}: {' '.join(command[:6])}{' ...' if len(command) > 6 else ''}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                            check=False, **kwargs)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        print(result.stdout[-4000:], result.stderr[-4000:], sep="\n")
        sys.exit(f"gpu-bundle: {name} failed (exit {result.returncode}) after {seconds:.0f} s")
    return seconds, result.stdout


def tree_bytes(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    return len(files), sum(p.stat().st_size for p in files)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "gpu")
    parser.add_argument("--split-size", type=int, default=512 * 2**20)
    parser.add_argument("--keep", action="store_true", help="keep the installed prefix and home")
    args = parser.parse_args()
    work = args.work.absolute()
    wheels, bundle, site = work / "wheels", work / "bundle", work / "site"
    work.mkdir(parents=True, exist_ok=True)
    spec = tomllib.loads(SPEC.read_text(encoding="utf-8"))
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    # The public index only: not this machine's pip configuration (local CPU wheels, mirrors).
    public = {"PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "PIP_NO_INDEX": ""}
    from bundler.spec import TargetSpec

    target = TargetSpec(python=spec["target"]["python"], platform=spec["target"]["platform"])
    platforms = [option for tag in target.platform_tags() for option in ("--platform", tag)]
    download_seconds, _ = step("download", [
        sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest", str(wheels),
        "--python-version", target.python, "--implementation", "cp", "--abi", "cp" + target.python.replace(".", ""),
        *platforms, *project["dependencies"], *spec["wheels"]["requirements"]], env=public)
    count, size = tree_bytes(wheels)
    print(f"downloaded: {count} wheels, {size / 2**30:.2f} GiB in {download_seconds:.0f} s")

    key = work / "key" / "signing-key.pem"
    signing = {"AIRLOCK_SIGNING_PASSPHRASE": PASSPHRASE}
    if not key.is_file():
        step("keygen", [str(BIN / "airlock-bundle"), "keygen", "--out", str(key.parent)], env=signing)
    pub = key.parent / "signing-key.pub.pem"
    shutil.rmtree(bundle, ignore_errors=True)
    # Offline from the download: pip sees WORK/wheels (and the spec's own find_links) only.
    offline = {**signing, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels)}
    build_seconds, out = step("build", [str(BIN / "airlock-bundle"), "build", str(SPEC), "--key", str(key), "--out",
                                        str(bundle), "--split-size", str(args.split_size)], env=offline)
    print(out.strip())
    files, bundle_bytes = tree_bytes(bundle)
    manifest = json.loads((bundle / "MANIFEST.json").read_bytes())
    print(f"bundle: {files} files, {bundle_bytes / 2**30:.2f} GiB, {len(manifest['split_files'])} files split in "
          f"{sum(len(s['parts']) for s in manifest['split_files'])} parts; build {build_seconds:.0f} s "
          f"({bundle_bytes / 2**20 / build_seconds:.0f} MiB/s)")
    verify_seconds, out = step("verify", [str(BIN / "airlock-bundle"), "verify", str(bundle), "--trust", str(pub)])
    print(out.strip())
    print(f"verify: {verify_seconds:.1f} s, {bundle_bytes / 2**20 / verify_seconds:.0f} MiB/s")

    if os.geteuid() != 0:
        sys.exit("gpu-bundle: the install step runs as root (it creates the service account); the bundle is built "
                 f"and verified in {bundle}")
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(mode=0o755)
    site.chmod(0o755)
    prefix, home = site / "prefix", site / "home"
    fingerprint = out.strip().splitlines()[0].rsplit(" ", 1)[-1]
    python = "/usr/bin/python3.11" if Path("/usr/bin/python3.11").exists() else "python3.11"
    install_seconds, out = step("install", ["unshare", "-n", "sh", str(bundle / "install.sh"), "--trust", fingerprint,
                                            "--prefix", str(prefix), "--home", str(home), "--python", python,
                                            "--user", SERVICE_USER], env={"AIRLOCK_HOME": str(home)})
    print("\n".join(line for line in out.splitlines() if line.strip()))
    _, installed_bytes = tree_bytes(prefix / "releases")
    _, store_bytes = tree_bytes(prefix / "store")
    print(f"install: {install_seconds:.0f} s; release (venv) {installed_bytes / 2**30:.2f} GiB, PREFIX/store "
          f"{store_bytes / 2**30:.2f} GiB")
    _, out = step("doctor", ["unshare", "-n", str(prefix / "bin" / "airlock"), "doctor", "--json"],
                  env={"AIRLOCK_HOME": str(home)})
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    for name in ("torch", "gpu", "onnxruntime", "tensorrt"):
        print(f"doctor {name:<12} {checks[name]['status']:<5} {checks[name]['detail']}")
    problems = []
    if "CUDA 12" not in checks["torch"]["detail"]:
        problems.append(f"torch is not the CUDA 12 build: {checks['torch']['detail']}")
    if checks["gpu"]["status"] != "warn" or "driver" not in checks["gpu"]["detail"]:
        problems.append(f"no driver is not reported as a warning: {checks['gpu']}")
    if "CUDAExecutionProvider" not in checks["onnxruntime"]["detail"]:
        problems.append(f"onnxruntime-gpu's CUDA provider is missing: {checks['onnxruntime']['detail']}")
    if not args.keep:
        shutil.rmtree(site, ignore_errors=True)
    if problems:
        sys.exit("gpu-bundle: smoke test: " + "; ".join(problems))
    print(f"SIZING | {files} files | {bundle_bytes / 2**30:.2f} GiB | build {build_seconds:.0f} s | verify "
          f"{bundle_bytes / 2**20 / verify_seconds:.0f} MiB/s | install {install_seconds:.0f} s | release "
          f"{installed_bytes / 2**30:.2f} GiB + store {store_bytes / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
