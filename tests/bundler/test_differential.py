"""Differential bundles (ADR 0018): only what changed ships; the rest comes from the installed base.

The session fixture `release_bundles` (tests/conftest.py) builds, from the local wheelhouse, a full bundle
of the appliance (v1), a differential v2 over it whose only change is one line of the appliance's code,
and a small differential over another base (the wrong base for v1). These tests read and verify those,
and check the installed code's refusals on a prefix laid out like install.sh's. The real install of v1
and the differential upgrade to v2 over it (refused while a held file is missing or altered, refused
over the wrong base, then installed) are part of tests/e2e/test_bundle_install.py's one install story:
each full install of the ~300 MB stack costs a minute or more, so the suite does it once.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.bundler.bundles import flip_bit, manifest_of, run_bundler
from tests.conftest import needs_unshare

# A code change ships the project wheel (~1 MB), install.sh, the lock and the SBOM: ~0.5% of the
# ~300 MB full payload (torch alone is ~200 MB). 5% leaves a margin of ten times.
MAX_SHIPPED_FRACTION = 0.05


def _bundle_bytes(bundle: Path) -> int:
    return sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())


def _whole_files(manifest: dict) -> dict[str, str]:
    parts = {p for s in manifest["split_files"] for p in s["parts"]}
    whole = {f["path"]: f["sha256"] for f in manifest["files"] if f["path"] not in parts}
    whole.update({s["path"]: s["sha256"] for s in manifest["split_files"]})
    return whole


def test_a_code_only_change_ships_a_small_fraction_and_lists_every_file(release_bundles, tmp_path):
    world = release_bundles  # built once per session (tests/conftest.py)
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
    stray = shutil.copytree(world["v2"], tmp_path / "stray")
    shutil.copy2(world["v1"] / "wheels" / "requirements.lock", stray / held[-1])
    refused = run_bundler("verify", str(stray), "--trust", world["fp"])
    assert refused.returncode == 2 and f"{held[-1]}: on the stick, but the manifest says" in refused.stderr


@needs_unshare
def test_a_differential_bundle_is_refused_over_a_fresh_prefix(release_bundles, tmp_path):
    world = release_bundles  # built once per session (tests/conftest.py)
    prefix, home = tmp_path / "prefix", tmp_path / "home"
    result = subprocess.run(["unshare", "-n", "sh", str(world["v2"] / "install.sh"), "--trust", world["fp"],
                             "--prefix", str(prefix), "--home", str(home)],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"install.sh: REFUSED: this differential bundle ships only what changed since airlock 0.1.0, and nothing is "
        f"installed under {prefix}; install the full bundle of airlock 0.2.0 instead"]
    assert not prefix.exists() and not home.exists()


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


def test_the_installed_code_checks_held_files_before_running_anything(release_bundles, tmp_path):
    world = release_bundles  # built once per session (tests/conftest.py)
    from appliance.upgrade import verify_for_upgrade
    from bundler.errors import BundleError

    prefix, home = _installed_like_install_sh(world, tmp_path)
    manifest = verify_for_upgrade(world["v2"], prefix, allow_downgrade=False, home=home)
    assert manifest.differential is not None and len(manifest.held_entries()) > 10
    held = {e.path: e for e in manifest.held_entries()}
    wheel = next(p for p in held if p.startswith("wheels/torch-"))
    copy = prefix / "store" / held[wheel].sha256
    original = flip_bit(copy)
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
