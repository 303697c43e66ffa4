"""Build, install, upgrade and roll back real bundles with no network.

Two bundles of the appliance with its full pinned CPU stack and the tiny model (split in parts)
are built from the local wheelhouse (`make venv` fills it), then installed into a temporary
prefix inside `unshare -n`: first install with install.sh, the installed `airlock doctor`,
refusals that must change nothing (lower sequence, another product), `airlock upgrade` to the
second bundle with a killed earlier install to clean up, and `airlock upgrade --rollback`. On the
way: a tampered bundle's install.sh never runs, and a release failing its smoke test is dropped.
About three minutes on two cores: two venv installs of ~300 MB of wheels dominate.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.bundler.bundles import build, make_key, require_wheelhouse, write_spec
from tests.conftest import needs_unshare

pytestmark = [needs_unshare, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict:
    require_wheelhouse("torch-2.13.0*.whl", "onnxruntime-1.32.0-*.whl", "mdurl-0.1.2-*.whl")
    root = tmp_path_factory.mktemp("e2e-bundles")
    key, fingerprint = make_key(root / "key")
    v1 = build(write_spec(root / "v1.toml", version="0.1.0", sequence=1, requirements=(), project=True),
               key, root / "airlock-0.1.0")
    v2 = build(write_spec(root / "v2.toml", version="0.2.0", sequence=2, requirements=(), project=True),
               key, root / "airlock-0.2.0")
    other = build(write_spec(root / "other.toml", product="other-product", version="9.0.0", sequence=9),
                  key, root / "other-9.0.0")
    # Signed and intact, but without the appliance: its smoke test (`airlock doctor`) must fail.
    no_app = build(write_spec(root / "no-app.toml", version="0.5.0", sequence=5), key, root / "airlock-0.5.0")
    # Signed by a new key: once with a rotation statement from the trusted key, once without.
    new_key, _ = make_key(root / "new-key")
    rotated = build(write_spec(root / "rotated.toml", version="0.6.0", sequence=6), new_key, root / "rotated",
                    "--rotate-from", str(key))
    unvouched = build(write_spec(root / "unvouched.toml", version="0.7.0", sequence=7), new_key, root / "unvouched")
    return {"fp": fingerprint, "v1": v1, "v2": v2, "other": other, "no_app": no_app, "rotated": rotated,
            "unvouched": unvouched, "root": root}


def _run(*command: str | Path, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["unshare", "-n", *map(str, command)], capture_output=True, text=True, timeout=timeout,
                          check=False, env={**os.environ, **(env or {})})


def test_install_doctor_upgrade_rollback(bundles, tmp_path):
    prefix, home, units = tmp_path / "opt-airlock", tmp_path / "var-lib-airlock", tmp_path / "units"
    # The installed appliance must find its state through its own wrapper, not this test's settings.
    env = {"AIRLOCK_HOME": str(home)}

    first = _run(bundles["v1"] / "install.sh", "--trust", bundles["fp"], "--prefix", prefix, "--home", home,
                 "--units-dir", units, "--enable-services", env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    # Units are written; enabling them needs root with systemctl and the real units directory.
    assert "services not enabled (needs root, systemctl and units in /etc/systemd/system)" in first.stdout
    assert "free space" in first.stdout and "glibc" in first.stdout  # the preflight table
    assert os.readlink(prefix / "current") == "releases/0.1.0"
    assert (prefix / "etc" / "sequence").read_text().strip() == "1"
    assert sorted(p.name for p in units.iterdir()) == ["airlock-retrain.service", "airlock-retrain.timer",
                                                       "airlock-serve.service"]
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

    # A killed earlier install left a half release and a staging copy: the next run removes them.
    (prefix / "releases" / "0.1.5").mkdir()
    (prefix / "releases" / "0.1.5" / ".incomplete").touch()
    (prefix / ".staging.99999").mkdir()

    upgraded = _run(airlock, "upgrade", bundles["v2"], env=env)
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    assert "verified with the installed key" in upgraded.stdout
    assert os.readlink(prefix / "current") == "releases/0.2.0"
    assert os.readlink(prefix / "previous") == "releases/0.1.0"
    assert not (prefix / "releases" / "0.1.5").exists() and not (prefix / ".staging.99999").exists()
    assert (prefix / "etc" / "sequence").read_text().strip() == "2"

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
