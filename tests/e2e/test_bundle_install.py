"""Build, install, upgrade and roll back real bundles with no network.

The releases come from the session fixture `release_bundles` (tests/bundler/bundles.py): a full bundle
of the appliance with its pinned CPU stack and the tiny model (split in parts), and a differential v2
over it whose only change is one line of code, both built from the local wheelhouse. One install story
runs inside `unshare -n`: the first install with install.sh, the installed `airlock doctor`, refusals
that must change nothing (lower sequence, another product, a tampered bundle, a release failing its
smoke test, a new signing key without the trusted key's statement), the differential v2 refused while a
file it takes from the installed release is missing or altered and over the wrong base (ADR 0018), then
`airlock upgrade` to v2 with a killed earlier install and a killed earlier upgrade to clean up, and
`airlock upgrade --rollback`.
The first install and the upgrade run under attack (ADR 0010): modules planted in the operator's
working directory (the stick) and in PYTHON* variables, and the stick's install.sh rewritten while it
runs; nothing planted runs, the service account owns AIRLOCK_HOME (0700), the units (run as that
account) go under the prefix, and nothing is written outside prefix and home but the account itself.
A full install of the ~300 MB stack dominates (about a minute on two idle cores, more while other
tests run): the suite does it once, here, and the upgrade installs the second venv.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.bundler.bundles import CHANGED_MARKER, CHANGED_MODULE, flip_bit, manifest_of
from tests.bundler.test_install_script import attacker_python, plant
from tests.conftest import SERVICE_USER, ensure_service_user, needs_unshare, remove_in_background

pytestmark = [needs_unshare, pytest.mark.slow, pytest.mark.timeout(900),
              pytest.mark.skipif(os.geteuid() != 0, reason="installs as root (creates the service account)")]
# What an install may change outside its prefix, home and units directory: the account it creates.
ACCOUNT_FILES = {"/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow", "/etc/passwd-", "/etc/group-",
                 "/etc/shadow-", "/etc/gshadow-", "/etc/.pwd.lock", "/etc/subuid", "/etc/subgid"}
SYSTEM_DIRS = ("/etc", "/usr", "/opt", "/srv", "/var/lib", "/lib")


@pytest.fixture
def site() -> Path:
    """Where the test installs: like /opt and /var/lib, others may traverse it (pytest's tmp_path
    is 0700, which the service account could not enter)."""
    root = Path(tempfile.mkdtemp(prefix="airlock-e2e-"))
    root.chmod(0o755)
    yield root
    remove_in_background(root)


def written_since(stamp: Path) -> list[str]:
    """Files under the system directories changed after `stamp`, but the account files."""
    found = subprocess.run(["find", *SYSTEM_DIRS, "-xdev", "-newer", str(stamp), "!", "-type", "d"],
                           capture_output=True, text=True, check=False).stdout.split()
    # The package manager's own state may change under another process; an install never writes there.
    return sorted(path for path in set(found) - ACCOUNT_FILES
                  if not path.startswith(("/var/lib/apt/", "/var/lib/dpkg/", "/var/lib/ucf/")))


def units_listing() -> list[tuple[str, int]]:
    units = Path("/etc/systemd/system")
    return sorted((str(p), p.lstat().st_mtime_ns) for p in units.rglob("*")) if units.is_dir() else []


def _listing(*roots: Path) -> list[tuple[str, int, int]]:
    """Every entry under `roots` with its size and mtime: equal before and after means nothing was written."""
    return sorted((str(p), p.lstat().st_size, p.lstat().st_mtime_ns) for root in roots for p in root.rglob("*"))


def pyc_of(source: Path) -> Path:
    return Path(importlib.util.cache_from_source(str(source)))


def _run(*command: str | Path, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["unshare", "-n", *map(str, command)], capture_output=True, text=True, timeout=timeout,
                          check=False, env={**os.environ, **(env or {})})


def test_install_doctor_upgrade_rollback(release_bundles, tmp_path, site):
    bundles = release_bundles
    prefix, home = site / "opt-airlock", site / "var-lib-airlock"
    # No --units-dir and a prefix outside /opt, /usr/local and /srv: the units go under the prefix.
    units = prefix / "systemd"
    # The installed appliance must find its state through its own wrapper, not this test's settings.
    env = {"AIRLOCK_HOME": str(home)}

    # The operator stands in the stick's directory; PYTHON* variables point at planted code; while
    # the install runs, the attacker plants venv.py, pip/ and ensurepip/ on the stick and rewrites
    # its install.sh (see attacker_python).
    stick = shutil.copytree(bundles["v1"], tmp_path / "stick-v1")
    marker = tmp_path / "planted-code-ran"
    (tmp_path / "attacker").mkdir()
    python = attacker_python(tmp_path / "attacker" / "python3.11", stick, marker)
    plant(tmp_path / "pythonpath", marker)
    attack_env = {**env, "PYTHONPATH": str(tmp_path / "pythonpath"), "PYTHONUSERBASE": str(tmp_path / "pythonpath")}
    units_before = units_listing()
    stamp = tmp_path / "stamp"
    stamp.touch()
    # The account exists before (tests/bundler/test_install_script.py covers install.sh creating one), so that
    # no other worker's useradd can race this install's.
    ensure_service_user()
    first = subprocess.run(["unshare", "-n", "sh", str(stick / "install.sh"), "--trust", bundles["fp"],
                            "--prefix", str(prefix), "--home", str(home), "--python", str(python), "--user",
                            SERVICE_USER, "--enable-services"], cwd=stick, capture_output=True, text=True,
                           timeout=600, check=False, env={**os.environ, **attack_env})
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"service account: {SERVICE_USER} (exists; reused)" in first.stdout
    assert "touch" in (stick / "install.sh").read_text() and (stick / "venv.py").exists()  # the attack happened
    assert not marker.exists(), marker.read_text()  # and nothing planted ran
    assert first.stderr == "", first.stderr  # no shell error (once: `vault: not found`)
    assert "byte-code: compiled on every core (no previous release to take it from)" in first.stdout
    # Units are written; enabling them needs root with systemctl and the real units directory.
    assert "services not enabled (needs root, systemctl and units in /etc/systemd/system)" in first.stdout
    assert "free space" in first.stdout and "glibc" in first.stdout  # the preflight table
    assert os.readlink(prefix / "current") == "releases/0.1.0"
    assert (prefix / "etc" / "sequence").read_text().strip() == "1"
    assert sorted(p.name for p in units.iterdir()) == ["airlock-retrain.service", "airlock-retrain.timer",
                                                       "airlock-serve.service"]
    # The service account exists and owns the home, 0700; the units run as it.
    account = pwd.getpwnam(SERVICE_USER)
    info = home.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (account.pw_uid, 0o700)
    assert all(p.lstat().st_uid == account.pw_uid for p in home.rglob("*"))
    assert f"User={SERVICE_USER}" in (units / "airlock-serve.service").read_text().splitlines()
    # Nothing outside prefix, home and units: /etc/systemd/system untouched, no system file changed.
    assert units_listing() == units_before
    assert written_since(stamp) == []
    airlock = prefix / "bin" / "airlock"
    doctor = _run(airlock, "doctor", "--json", env=env)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    checks = {c["name"]: c["status"] for c in json.loads(doctor.stdout)["checks"]}
    assert checks["torch"] == checks["onnxruntime"] == checks["network"] == "ok"
    models = json.loads(_run(airlock, "base-models", "list", "--json", env=env).stdout)["models"]
    assert [m["name"] for m in models] == ["tiny-deepseek-r1"]
    assert models[0]["has_weights"]  # the split safetensors were reassembled into the store

    # Refused, and nothing changes: the same sequence again, and a bundle for another product.
    again = _run(bundles["v1"] / "install.sh", "--trust", bundles["fp"], "--prefix", prefix, "--home", home, env=env)
    assert again.returncode != 0 and "rollback protection" in again.stderr
    other = _run(bundles["other"] / "install.sh", "--trust", bundles["fp"], "--prefix", prefix, "--home", home,
                 env=env)
    assert other.returncode != 0 and "'other-product'" in other.stderr
    refused = _run(airlock, "upgrade", bundles["other"], env=env)
    assert refused.returncode == 2 and "product 'other-product'" in refused.stderr
    assert os.readlink(prefix / "current") == "releases/0.1.0"

    # Nothing from a bundle runs before it verifies: this install.sh would leave a marker.
    tampered = shutil.copytree(bundles["other"], tmp_path / "tampered")
    marker = tmp_path / "install-sh-ran"
    (tampered / "install.sh").write_text(f"#!/bin/sh\ntouch {marker}\n")
    refused = _run(airlock, "upgrade", tampered, env=env)
    assert refused.returncode == 2 and refused.stderr.startswith("error: install.sh: size")
    assert not marker.exists()

    # A release that fails its smoke test never becomes current and leaves nothing selectable.
    broken = _run(airlock, "upgrade", bundles["no_app"], env=env)
    assert broken.returncode == 2 and "smoke test failed" in broken.stderr
    assert os.readlink(prefix / "current") == "releases/0.1.0"
    assert sorted(p.name for p in (prefix / "releases").iterdir()) == ["0.1.0"]
    assert (prefix / "etc" / "sequence").read_text().strip() == "1"

    # Key rotation: a new signer is accepted only with the trusted key's statement. (These two
    # bundles carry no appliance, so the accepted one stops at the smoke test and changes nothing.)
    unvouched = _run(airlock, "upgrade", bundles["unvouched"], env=env)
    assert unvouched.returncode == 2 and "is not trusted" in unvouched.stderr
    trusted_before = (prefix / "etc" / "trusted-key.pem").read_bytes()
    rotated = _run(airlock, "upgrade", bundles["rotated"], env=env)
    assert "verified with the installed key: airlock 0.6.0" in rotated.stdout, rotated.stderr
    assert rotated.returncode == 2 and "smoke test failed" in rotated.stderr
    assert (prefix / "etc" / "trusted-key.pem").read_bytes() == trusted_before

    # The differential v2 takes what it does not ship (torch's wheel, the model...) from the installed
    # release, by SHA-256: while one of those is missing or altered, or over another base, install.sh and
    # `airlock upgrade` both refuse with one line naming the file, and nothing is written.
    v2 = bundles["v2"]
    manifest = manifest_of(v2)
    held = manifest["differential"]["held"]
    sizes = {f["path"]: f for f in manifest["files"]}
    wheel = next(p for p in held if p.startswith("wheels/torch-"))
    model = "models/tiny-deepseek-r1/model.safetensors"
    wheel_copy = prefix / "store" / sizes[wheel]["sha256"]
    model_copy = home / "models" / "store" / sizes[model]["sha256"]
    assert wheel_copy.is_file() and model_copy.is_file()  # the base keeps its content by hash
    full_bundle = "install the full bundle of airlock 0.2.0 instead"

    def refused_by_both(expected: str) -> None:
        before = _listing(prefix)
        by_script = _run("sh", v2 / "install.sh", "--trust", bundles["fp"], "--prefix", prefix, "--home", home,
                         env=env)
        assert by_script.returncode == 1, by_script.stdout + by_script.stderr
        assert by_script.stderr.splitlines() == [f"install.sh: REFUSED: {expected}"], by_script.stderr
        by_upgrade = _run(airlock, "upgrade", v2, env=env)
        assert by_upgrade.returncode == 2, by_upgrade.stdout + by_upgrade.stderr
        assert by_upgrade.stderr.startswith("error: "), by_upgrade.stderr
        assert expected.split(":")[0] in by_upgrade.stderr.splitlines()[0]
        assert _listing(prefix) == before  # no release, no staging copy, no store change
        assert os.readlink(prefix / "current") == "releases/0.1.0"

    wheel_bytes = wheel_copy.read_bytes()
    wheel_copy.unlink()
    refused_by_both(f"{wheel}: the differential bundle needs it from the installed release 0.1.0, which lacks it "
                    f"(SHA-256 {sizes[wheel]['sha256'][:16]}... in {prefix}/store or {home}/models/store); "
                    f"{full_bundle}")
    wheel_copy.write_bytes(wheel_bytes)
    wheel_copy.chmod(0o444)
    flip_bit(wheel_copy)  # present, one bit altered
    refused_by_both(f"{wheel}: the installed release's copy {wheel_copy} does not match the manifest's SHA-256 "
                    f"(tampered with or damaged); tell your security office, then {full_bundle}")
    wheel_copy.write_bytes(wheel_bytes)
    model_bytes = flip_bit(model_copy)  # a held model file in the service account's model store
    refused_by_both(f"{model}: the installed release's copy {model_copy} does not match the manifest's SHA-256 "
                    f"(tampered with or damaged); tell your security office, then {full_bundle}")
    model_copy.write_bytes(model_bytes)
    before = _listing(prefix)
    wrong = _run("sh", bundles["wrong"] / "install.sh", "--trust", bundles["fp"], "--prefix", prefix, "--home", home,
                 env=env)
    assert wrong.returncode == 1 and "this differential bundle needs airlock 0.0.9 (bundle " in wrong.stderr
    assert f"but {prefix} runs 0.1.0 (bundle {manifest['differential']['base_bundle_id'][:16]})" in wrong.stderr
    wrong_upgrade = _run(airlock, "upgrade", bundles["wrong"], env=env)
    assert wrong_upgrade.returncode == 2 and "needs airlock 0.0.9" in wrong_upgrade.stderr
    assert _listing(prefix) == before

    # A killed earlier install left a half release and a staging copy: the next run removes them.
    (prefix / "releases" / "0.1.5").mkdir()
    (prefix / "releases" / "0.1.5" / ".incomplete").touch()
    (prefix / ".staging.99999").mkdir()
    # And a killed earlier `airlock upgrade` left its verified copy of a stick (the next upgrade removes it).
    (prefix / ".upgrade.killed" / "wheels").mkdir(parents=True)

    # The upgrade runs install.sh from its verified copy: the stick, rewritten while the install
    # runs, is never read again.
    stick = shutil.copytree(bundles["v2"], tmp_path / "stick-v2")
    (tmp_path / "attacker-2").mkdir()
    python = attacker_python(tmp_path / "attacker-2" / "python3.11", stick, marker)
    upgraded = _run(airlock, "upgrade", stick, "--python", python, env=attack_env)
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    assert "verified with the installed key" in upgraded.stdout
    assert "touch" in (stick / "install.sh").read_text() and not marker.exists()
    assert not list(prefix.glob(".upgrade.*"))  # the verified copy is removed, and the killed upgrade's
    assert f"removed {prefix / '.upgrade.killed'}, the copy of an interrupted upgrade" in upgraded.stdout
    assert units_listing() == units_before
    assert os.readlink(prefix / "current") == "releases/0.2.0"
    assert os.readlink(prefix / "previous") == "releases/0.1.0"
    assert not (prefix / "releases" / "0.1.5").exists() and not (prefix / ".staging.99999").exists()
    assert (prefix / "etc" / "sequence").read_text().strip() == "2"
    # Over its intact base the differential installed: the held files came from the installed release.
    assert f"differential over airlock 0.1.0: {len(held)} files checked" in upgraded.stdout
    doctor = _run(airlock, "doctor", "--json", env=env)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    checks = {c["name"]: c["status"] for c in json.loads(doctor.stdout)["checks"]}
    assert checks["torch"] == checks["onnxruntime"] == "ok"
    installed = list((prefix / "releases" / "0.2.0" / "venv").glob(f"lib/python3.*/site-packages/{CHANGED_MODULE}"))
    assert len(installed) == 1 and installed[0].read_text(encoding="utf-8").endswith(CHANGED_MARKER)
    # Byte-code (ADR 0021): the unchanged sources took 0.1.0's pyc, the changed module was compiled; the
    # interpreter takes both as they are (`python -v`: "matches"; a stale pyc would be compiled on every start).
    reused, sources = map(int, re.search(r"byte-code: (\d+) of (\d+) modules taken from the previous release",
                                         upgraded.stdout).groups())
    assert 0.9 * sources < reused < sources, upgraded.stdout
    new_site = installed[0].parents[1]
    old_site = prefix / "releases" / "0.1.0" / "venv" / new_site.relative_to(prefix / "releases" / "0.2.0" / "venv")
    torch_init = new_site / "torch" / "__init__.py"
    verbose = _run(new_site.parents[2] / "bin" / "python", "-I", "-B", "-v", "-c", "import appliance.doctor, torch")
    for source in (installed[0], torch_init):
        assert f"# {pyc_of(source)} matches {source}" in verbose.stderr
    assert pyc_of(torch_init).read_bytes() == pyc_of(old_site / "torch" / "__init__.py").read_bytes()
    assert pyc_of(installed[0]).read_bytes() != pyc_of(old_site / CHANGED_MODULE).read_bytes()
    assert json.loads(_run(airlock, "base-models", "list", "--json", env=env).stdout)["models"][0]["has_weights"]
    # v2's own new content joined the store: the next differential can be built over v2.
    new_wheel = next(f for f in manifest["files"] if f["path"].startswith("wheels/airlock-"))
    assert (prefix / "store" / new_wheel["sha256"]).is_file()

    downgrade = _run(airlock, "upgrade", bundles["v1"], env=env)
    assert downgrade.returncode == 2 and "rollback protection" in downgrade.stderr

    rolled = _run(airlock, "upgrade", "--rollback", env=env)
    assert rolled.returncode == 0, rolled.stderr
    assert os.readlink(prefix / "current") == "releases/0.1.0"
    assert os.readlink(prefix / "previous") == "releases/0.2.0"
    assert (prefix / "etc" / "sequence").read_text().strip() == "2"  # the high-water mark stays
    # --allow-downgrade lets an older sequence through the preflight (the install then refuses to
    # overwrite the release directory that already holds 0.1.0).
    allowed = _run(bundles["v1"] / "install.sh", "--trust", bundles["fp"], "--prefix", prefix, "--home", home,
                   "--allow-downgrade", env=env)
    assert "downgrade (allowed, audited)" in allowed.stdout
    assert allowed.returncode != 0 and "releases/0.1.0 already exists" in allowed.stderr
    assert _run(airlock, "doctor", env=env).returncode == 0

    audit = json.loads(_run(airlock, "audit", "show", "--json", env=env).stdout)["entries"]
    assert [e["action"] for e in reversed(audit)] == ["release.install", "release.upgrade", "release.rollback"]
    assert audit[1]["details"]["previous"] == "releases/0.1.0"
    assert _run(airlock, "audit", "verify", env=env).returncode == 0
