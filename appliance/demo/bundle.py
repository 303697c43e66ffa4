"""Demo stages 1-2, run from a source checkout: build a signed bundle, install it with no network.

    installed = build_and_install(work, report)   # -> Installed(prefix, airlock, isolated)

Stage 1 is what a vendor does on a build station, with `airlock-bundle` (a throwaway signing key
in the demo's folder, the local wheelhouse that `make venv` fills, the tiny models); stage 2 is what
site IT does: `install.sh --trust FINGERPRINT` inside `unshare -n` (a network namespace with no
interfaces up) where this machine permits it. Both are subprocesses: the appliance never imports
the bundler's build code (import-linter contract).
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.demo.steps import Cli, DemoError, Report, Stage, format_metric, say

CLASSIFIER_SEED = 0


@dataclass(frozen=True)
class Installed:
    prefix: Path
    airlock: Path
    isolated: bool
    """True when installing and the later stages ran inside `unshare -n`."""


def unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False).returncode == 0


def checkout_root() -> Path:
    from appliance.paths import source_checkout

    root = source_checkout()
    if root is None:
        raise DemoError("the full demo builds a bundle from a source checkout, and this appliance is installed",
                        hint="run `make demo` in the airlock repository, or `airlock demo --skip-bundle` here")
    return root


def wheelhouse(root: Path) -> Path:
    found = root / ".cache" / "wheelhouse"
    if not any(found.glob("torch-*.whl")) or not any(found.glob("onnxruntime-*.whl")):
        raise DemoError(f"{found} has no torch/onnxruntime wheels to build the bundle from",
                        hint="run `make venv` (with network, once): it downloads the wheels the bundle ships")
    return found


def classifier_base(dest: Path) -> Path:
    """tiny-resnet-cls with seeded initial weights as safetensors: bundles ship weights, never a bare config."""
    from transformers.utils import logging as hf_logging

    from appliance.base_models import resolve_base_model
    from appliance.train.classifier import load_classifier

    hf_logging.disable_progress_bar()  # "Writing model shards" bars garble the demo's output
    base = resolve_base_model("tiny-resnet-cls")
    model = load_classifier(base, num_labels=2, seed=CLASSIFIER_SEED)
    model.save_pretrained(dest)
    return dest


def write_spec(path: Path, root: Path, wheels: Path, classifier: Path) -> Path:
    lines = ['product = "airlock"', 'version = "0.1.0"', "sequence = 1", "expires = 2099-12-31",
             "[target]", 'python = "3.11"', 'platform = "manylinux_2_28_x86_64"', "cuda_major = 0",
             "[wheels]", "requirements = []", f"find_links = [{json.dumps(str(wheels))}]",
             "# offline: the local wheelhouse only", "index = false",
             "[project]", f"path = {json.dumps(str(root))}", 'extras = ["appliance"]',
             "[[models]]", 'name = "tiny-deepseek-r1"',
             f"path = {json.dumps(str(root / 'models' / 'tiny-deepseek-r1'))}",
             "[[models]]", 'name = "tiny-resnet-cls"', f"path = {json.dumps(str(classifier))}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def build_bundle(work: Path, report: Report) -> tuple[Path, str]:
    """Stage 1. Returns (bundle directory, signer fingerprint)."""
    root = checkout_root()
    station = work / "build-station"
    station.mkdir(parents=True, exist_ok=True)
    bundler = Cli(Path(sys.executable).parent / "airlock-bundle", cwd=station,
                  env={"AIRLOCK_SIGNING_PASSPHRASE": secrets.token_urlsafe(24)})
    with Stage(report, "build signed bundle", "1. build a signed bundle (local wheelhouse, tiny models)") as stage:
        wheels = wheelhouse(root)
        keygen = bundler.run("keygen", "--out", str(station / "keys"))
        fingerprint = keygen.stdout.strip().splitlines()[-1].split()[-1]
        say(f"throwaway signing key, fingerprint {fingerprint[:16]}...")
        spec = write_spec(station / "demo.toml", root, wheels, classifier_base(station / "models" / "tiny-resnet-cls"))
        bundle = work / "usb" / "airlock-0.1.0"
        bundler.run("build", str(spec), "--key", str(station / "keys" / "signing-key.pem"), "--out", str(bundle),
                    timeout=3600)
        inspect = bundler.json("inspect", str(bundle))
        say(f"{len(inspect['wheels'])} wheels, models {', '.join(sorted(inspect['models']))}; "
            f"{inspect['payload_bytes'] / 1e6:.0f} MB, SBOM {inspect['sbom']['libraries']} libraries")
        started = time.perf_counter()
        verified = bundler.json("verify", str(bundle), "--trust", fingerprint)
        seconds = time.perf_counter() - started
        rate = verified["payload_bytes"] / 1e6 / seconds if seconds > 0 else None
        say(f"verify: signature and {verified['files']} files' SHA-256 in {seconds:.1f} s "
            f"({format_metric(rate, '{:.0f} MB/s')})")
        stage.metric = (f"{inspect['payload_bytes'] / 1e6:.0f} MB, {verified['files']} files; "
                        f"verify {format_metric(rate, '{:.0f} MB/s')}")
        stage.artifacts = f"{bundle} (spec {spec})"
        report.facts["bundle"] = {"path": str(bundle), "payload_bytes": verified["payload_bytes"],
                                  "verify_mb_per_s": rate, "files": verified["files"]}
    return bundle, fingerprint


def install_bundle(work: Path, bundle: Path, fingerprint: str, report: Report) -> Installed:
    """Stage 2: install.sh into WORK/opt-airlock with WORK/home as its state, inside `unshare -n` if permitted."""
    isolated = unshare_works()
    prefix, home = work / "opt-airlock", work / "home"
    wrap = ["unshare", "-n"] if isolated else []
    with Stage(report, "install (no network)", "2. install.sh: verify, preflight, install with no network") as stage:
        if isolated:
            say("inside `unshare -n`: a network namespace with no interface up, not even loopback")
        else:
            say("`unshare -n` is not permitted here (needs root or user namespaces): installing with the network "
                "present; install.sh still uses only the bundle's wheels (pip --no-index)")
        installer = Cli(bundle / "install.sh", wrap=wrap, cwd=work, env={"AIRLOCK_HOME": str(home)})
        out = installer.run("--trust", fingerprint, "--prefix", str(prefix), "--home", str(home),
                            "--units-dir", str(work / "units"), timeout=3600)
        for line in out.stdout.splitlines():
            if line.startswith(("verified:", "installed ")):
                say(line.strip())
        airlock = prefix / "bin" / "airlock"
        doctor = Cli(airlock, wrap=wrap, env={"AIRLOCK_HOME": str(home)}).json("doctor")
        checks = {c["name"]: c for c in doctor["checks"]}
        say(f"installed airlock doctor: {doctor['status']}; network: {checks['network']['detail']}")
        stage.metric = f"doctor {doctor['status']}, network {'isolated' if isolated else 'present (no unshare)'}"
        stage.artifacts = f"{prefix} (release {(prefix / 'current').resolve().name}), home {home}"
    return Installed(prefix, airlock, isolated)


def build_and_install(work: Path, report: Report) -> Installed:
    bundle, fingerprint = build_bundle(work, report)
    return install_bundle(work, bundle, fingerprint, report)
