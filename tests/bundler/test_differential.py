"""Differential bundles (ADR 0018): only what changed ships; the rest comes from the installed base.

One module fixture builds, from the local wheelhouse, a full bundle of the appliance (v1), a
differential v2 over it whose only change is one line of the appliance's code, and a small
differential over another base (the wrong base for v1). The cheap tests read and verify those;
the slow one installs v1 once under `unshare -n` and then, on that one install, sees install.sh
and `airlock upgrade` refuse v2 while a held file is missing or altered in the installed release
(one line naming the file, nothing written), refuse the differential over another base, and
finally install v2 over its base. About 3 minutes on two idle cores (two venv installs of
~300 MB of wheels, as in tests/e2e/test_bundle_install.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from bundler.wheels import BUILD_STATE
from tests.bundler.bundles import build, make_key, manifest_of, require_wheelhouse, run_bundler, write_spec
from tests.conftest import REPO, SERVICE_USER, ensure_service_user, needs_unshare

# The code-only change of v2: one line appended to a module the installed `airlock doctor` imports.
CHANGED_MODULE = "appliance/doctor.py"
MARKER = "# differential-bundle test: the v2 code change\n"
# A code change ships the project wheel (~1 MB), install.sh, the lock and the SBOM: ~0.5% of the
# ~300 MB full payload (torch alone is ~200 MB). 5% leaves a margin of ten times.
MAX_SHIPPED_FRACTION = 0.05


def _build_differential(spec: Path, key: Path, out: Path, base: Path) -> Path:
    return build(spec, key, out, "--differential-from", str(base))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    require_wheelhouse("torch-2.13.0*.whl", "onnxruntime-1.32.0-*.whl", "mdurl-0.1.2-*.whl")
    root = tmp_path_factory.mktemp("differential")
    key, fingerprint = make_key(root / "key")
    v1 = build(write_spec(root / "v1.toml", version="0.1.0", sequence=1, requirements=(), project=True),
               key, root / "airlock-0.1.0")
    changed = root / "source-v2" / REPO.name
    shutil.copytree(REPO, changed, symlinks=True, ignore=shutil.ignore_patterns(*BUILD_STATE))
    with (changed / CHANGED_MODULE).open("a", encoding="utf-8") as handle:
        handle.write(MARKER)
    v2 = _build_differential(write_spec(root / "v2.toml", version="0.2.0", sequence=2, requirements=(), project=True,
                                        project_path=changed), key, root / "airlock-0.2.0-diff", v1)
    # A differential over some other release of the product: the wrong base for an install of v1.
    other_base = build(write_spec(root / "other.toml", version="0.0.9", sequence=1), key, root / "airlock-0.0.9")
    wrong = _build_differential(write_spec(root / "wrong.toml", version="0.3.0", sequence=3), key,
                                root / "airlock-0.3.0-diff", other_base)
    return {"fp": fingerprint, "key": key, "v1": v1, "v2": v2, "wrong": wrong, "root": root}


def _bundle_bytes(bundle: Path) -> int:
    return sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())


def _whole_files(manifest: dict) -> dict[str, str]:
    parts = {p for s in manifest["split_files"] for p in s["parts"]}
    whole = {f["path"]: f["sha256"] for f in manifest["files"] if f["path"] not in parts}
    whole.update({s["path"]: s["sha256"] for s in manifest["split_files"]})
    return whole


def test_a_code_only_change_ships_a_small_fraction_and_lists_every_file(world):
    v1, v2 = manifest_of(world["v1"]), manifest_of(world["v2"])
    assert "differential" not in v1  # a full bundle's manifest is what it always was
    held = v2["differential"]["held"]
    assert v2["differential"]["base_bundle_id"] == v1["bundle_id"]
    # Every file of the release is listed with its hash; only the changed project wheel (and what
    # always ships) is on the stick.
    listed = {f["path"]: f["sha256"] for f in v2["files"]}
    base_files = _whole_files(v1)
    assert set(listed) == set(base_files)
    changed = {p for p in listed if listed[p] != base_files[p]}
    wheels = {p for p in changed if p.endswith(".whl")}
    assert len(wheels) == 1 and next(iter(wheels)).startswith("wheels/airlock-"), changed
    assert changed - wheels <= {"install.sh", "sbom.cdx.json", "wheels/requirements.lock"}, changed
    holdable = {p for p in listed if p.startswith("models/") or (p.startswith("wheels/") and p.endswith(".whl"))}
    assert set(held) == holdable - changed
    on_stick = {p.relative_to(world["v2"]).as_posix() for p in world["v2"].rglob("*") if p.is_file()}
    assert not on_stick & set(held)
    assert {"install.sh", "sbom.cdx.json", "wheels/requirements.lock"} <= on_stick
    # The model was split in parts in v1; held, it is listed whole (splitting is how a file ships).
    assert "models/tiny-deepseek-r1/model.safetensors" in held and v2["split_files"] == []

    full, shipped = sum(f["size"] for f in v2["files"]), _bundle_bytes(world["v2"])
    fraction = shipped / full
    print(f"differential bundle for a code-only change: {shipped / 2**20:.2f} MiB on the stick vs "
          f"{full / 2**20:.1f} MiB for the full release ({fraction:.2%}); full v1 bundle "
          f"{_bundle_bytes(world['v1']) / 2**20:.1f} MiB")
    assert fraction < MAX_SHIPPED_FRACTION

    verified = run_bundler("verify", str(world["v2"]), "--trust", world["fp"])
    assert verified.returncode == 0, verified.stderr
    assert f"{len(held)} files come from that installed release" in verified.stdout
    # A held file that is on the stick after all is refused, like any file the manifest does not ship.
    stray = shutil.copytree(world["v2"], world["root"] / "stray")
    shutil.copy2(world["v1"] / "wheels" / "requirements.lock", stray / held[-1])
    refused = run_bundler("verify", str(stray), "--trust", world["fp"])
    assert refused.returncode == 2 and f"{held[-1]}: on the stick, but the manifest says" in refused.stderr


@needs_unshare
def test_a_differential_bundle_is_refused_over_a_fresh_prefix(world, tmp_path):
    prefix, home = tmp_path / "prefix", tmp_path / "home"
    result = subprocess.run(["unshare", "-n", "sh", str(world["v2"] / "install.sh"), "--trust", world["fp"],
                             "--prefix", str(prefix), "--home", str(home)],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"install.sh: REFUSED: this differential bundle ships only what changed since airlock 0.1.0, and nothing is "
        f"installed under {prefix}; install the full bundle of airlock 0.2.0 instead"]
    assert not prefix.exists() and not home.exists()


def _listing(*roots: Path) -> list[tuple[str, int, int]]:
    """Every entry under `roots` with its size and mtime: equal before and after means nothing was written."""
    return sorted((str(p), p.lstat().st_size, p.lstat().st_mtime_ns) for root in roots for p in root.rglob("*"))


def _flip(path: Path) -> bytes:
    original = path.read_bytes()
    changed = bytearray(original)
    changed[len(changed) // 2] ^= 0x01
    path.write_bytes(bytes(changed))
    return original


@pytest.fixture
def site() -> Path:
    root = Path(tempfile.mkdtemp(prefix="airlock-diff-"))
    root.chmod(0o755)  # the service account enters it, as it would /opt and /var/lib
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _run(*command: str | Path, home: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    # The installed wrapper takes AIRLOCK_HOME from the environment when set (this test's own is elsewhere).
    return subprocess.run(["unshare", "-n", *map(str, command)], capture_output=True, text=True, timeout=timeout,
                          check=False, env={**os.environ, "AIRLOCK_HOME": str(home)})


@needs_unshare
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(os.geteuid() != 0, reason="installs as root (creates the service account)")
def test_a_differential_bundle_installs_only_over_its_intact_base(world, site):
    from tests.bundler.test_install_script import system_python

    prefix, home = site / "opt-airlock", site / "var-lib-airlock"
    install = ["sh", world["v1"] / "install.sh", "--trust", world["fp"], "--prefix", prefix, "--home", home,
               "--python", system_python(), "--user", SERVICE_USER]
    ensure_service_user()  # created beforehand: no other worker's useradd races this install's
    first = _run(*install, home=home)
    assert first.returncode == 0, first.stdout + first.stderr
    airlock = prefix / "bin" / "airlock"
    v2 = world["v2"]
    diff_install = ["sh", v2 / "install.sh", "--trust", world["fp"], "--prefix", prefix, "--home", home]
    manifest = manifest_of(v2)
    sizes = {f["path"]: f for f in manifest["files"]}
    wheel = next(p for p in manifest["differential"]["held"] if p.startswith("wheels/torch-"))
    model = "models/tiny-deepseek-r1/model.safetensors"
    wheel_copy = prefix / "store" / sizes[wheel]["sha256"]
    model_copy = home / "models" / "store" / sizes[model]["sha256"]
    assert wheel_copy.is_file() and model_copy.is_file()  # the base keeps its content by hash
    before = _listing(prefix)

    def refused_by_both(expected: str) -> None:
        by_script = _run(*diff_install, home=home)
        assert by_script.returncode == 1, by_script.stdout + by_script.stderr
        assert by_script.stderr.splitlines() == [f"install.sh: REFUSED: {expected}"], by_script.stderr
        by_upgrade = _run(airlock, "upgrade", v2, home=home)
        assert by_upgrade.returncode == 2, by_upgrade.stdout + by_upgrade.stderr
        assert by_upgrade.stderr.startswith("error: "), by_upgrade.stderr
        assert expected.split(":")[0] in by_upgrade.stderr.splitlines()[0]
        assert _listing(prefix) == before  # nothing written: no release, no staging copy, no store change
        assert os.readlink(prefix / "current") == "releases/0.1.0"

    # A held wheel missing from the installed release: refused, naming it.
    wheel_bytes = wheel_copy.read_bytes()
    wheel_copy.unlink()
    before = _listing(prefix)
    refused_by_both(f"{wheel}: the differential bundle needs it from the installed release 0.1.0, which lacks it "
                    f"(SHA-256 {sizes[wheel]['sha256'][:16]}... in {prefix}/store or {home}/models/store); "
                    "install the full bundle of airlock 0.2.0 instead")
    # The same wheel present but altered (one bit): refused, naming it.
    wheel_copy.write_bytes(wheel_bytes)
    wheel_copy.chmod(0o444)
    _flip(wheel_copy)
    before = _listing(prefix)
    refused_by_both(f"{wheel}: the installed release's copy {wheel_copy} does not match the manifest's SHA-256 "
                    "(tampered with or damaged); tell your security office, then install the full bundle of "
                    "airlock 0.2.0 instead")
    wheel_copy.write_bytes(wheel_bytes)
    # A held model file altered in the model store (the service account's): refused too.
    model_bytes = _flip(model_copy)
    before = _listing(prefix)
    refused_by_both(f"{model}: the installed release's copy {model_copy} does not match the manifest's SHA-256 "
                    "(tampered with or damaged); tell your security office, then install the full bundle of "
                    "airlock 0.2.0 instead")
    model_copy.write_bytes(model_bytes)

    # A differential built over another release of the product: refused before anything is checked.
    wrong = _run("sh", world["wrong"] / "install.sh", "--trust", world["fp"], "--prefix", prefix, "--home", home,
                 home=home)
    assert wrong.returncode == 1 and "this differential bundle needs airlock 0.0.9 (bundle " in wrong.stderr
    assert f"but {prefix} runs 0.1.0 (bundle {manifest['differential']['base_bundle_id'][:16]})" in wrong.stderr
    wrong_upgrade = _run(airlock, "upgrade", world["wrong"], home=home)
    assert wrong_upgrade.returncode == 2 and "needs airlock 0.0.9" in wrong_upgrade.stderr
    assert _listing(prefix) == before

    # Over its intact base the differential installs: the held files come from the installed release.
    upgraded = _run(airlock, "upgrade", v2, home=home)
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    assert f"differential over airlock 0.1.0: {len(manifest['differential']['held'])} files checked" in upgraded.stdout
    assert os.readlink(prefix / "current") == "releases/0.2.0"
    doctor = _run(airlock, "doctor", "--json", home=home)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    checks = {c["name"]: c["status"] for c in json.loads(doctor.stdout)["checks"]}
    assert checks["torch"] == checks["onnxruntime"] == "ok"
    installed = list((prefix / "releases" / "0.2.0" / "venv").glob(f"lib/python3.*/site-packages/{CHANGED_MODULE}"))
    assert len(installed) == 1 and installed[0].read_text(encoding="utf-8").endswith(MARKER)
    models = json.loads(_run(airlock, "base-models", "list", "--json", home=home).stdout)["models"]
    assert models[0]["has_weights"]
    # v2's own new content joined the store: the next differential can be built over v2.
    new_wheel = next(f for f in manifest["files"] if f["path"].startswith("wheels/airlock-"))
    assert (prefix / "store" / new_wheel["sha256"]).is_file()


def _installed_like_install_sh(world: dict, root: Path) -> tuple[Path, Path]:
    """A prefix and home laid out as install.sh leaves them after installing v1 (its trust state, its
    recorded manifest, its content stores by SHA-256), without the venv: what `airlock upgrade` reads."""
    prefix, home = root / "prefix", root / "home"
    release = prefix / "releases" / "0.1.0" / "bundle"
    release.mkdir(parents=True)
    for name in ("MANIFEST.json", "MANIFEST.json.sig", "signer.pub.pem"):
        shutil.copy(world["v1"] / name, release / name)
    (prefix / "current").symlink_to("releases/0.1.0")
    (prefix / "etc").mkdir()
    shutil.copy(world["v1"] / "signer.pub.pem", prefix / "etc" / "trusted-key.pem")
    (prefix / "etc" / "sequence").write_text("1\n")
    (prefix / "etc" / "product").write_text("airlock\n")
    manifest = manifest_of(world["v1"])
    parts = {p: s for s in manifest["split_files"] for p in s["parts"]}
    for entry in manifest["files"]:
        if entry["path"] in parts:
            continue
        store = home / "models" / "store" if entry["path"].startswith("models/") else prefix / "store"
        store.mkdir(parents=True, exist_ok=True)
        shutil.copy(world["v1"] / entry["path"], store / entry["sha256"])
    for split in manifest["split_files"]:  # reassembled, like install.sh does (the test split size splits wheels too)
        store = home / "models" / "store" if split["path"].startswith("models/") else prefix / "store"
        store.mkdir(parents=True, exist_ok=True)
        (store / split["sha256"]).write_bytes(b"".join((world["v1"] / part).read_bytes() for part in split["parts"]))
    return prefix, home


def test_the_installed_code_checks_held_files_before_running_anything(world, tmp_path):
    from appliance.upgrade import verify_for_upgrade
    from bundler.errors import BundleError

    prefix, home = _installed_like_install_sh(world, tmp_path)
    manifest = verify_for_upgrade(world["v2"], prefix, allow_downgrade=False, home=home)
    assert manifest.differential is not None and len(manifest.held_entries()) > 10
    held = {e.path: e for e in manifest.held_entries()}
    wheel = next(p for p in held if p.startswith("wheels/torch-"))
    copy = prefix / "store" / held[wheel].sha256
    original = _flip(copy)
    with pytest.raises(BundleError, match=rf"^{re.escape(wheel)}: the installed release's copy .* does not match"):
        verify_for_upgrade(world["v2"], prefix, allow_downgrade=False, home=home)
    copy.unlink()
    with pytest.raises(BundleError, match=rf"^{re.escape(wheel)}: the differential bundle needs it from the "
                                          r"installed release 0\.1\.0, which lacks it"):
        verify_for_upgrade(world["v2"], prefix, allow_downgrade=False, home=home)
    copy.write_bytes(original)
    with pytest.raises(BundleError, match=r"needs airlock 0\.0\.9 \(bundle [0-9a-f]{16}\) installed, but .* runs "
                                          r"0\.1\.0"):
        verify_for_upgrade(world["wrong"], prefix, allow_downgrade=False, home=home)
    (prefix / "current").unlink()
    with pytest.raises(BundleError, match="no readable release is installed"):
        verify_for_upgrade(world["v2"], prefix, allow_downgrade=False, home=home)
