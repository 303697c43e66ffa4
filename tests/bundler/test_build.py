"""`airlock-bundle` keygen/build/verify/inspect/diff as real subprocesses with real pip and openssl."""

from __future__ import annotations

import json
import subprocess
import tarfile

import pytest

from tests.bundler.bundles import (
    SPLIT_BYTES,
    TINY_MODEL,
    WHEELHOUSE,
    build,
    make_key,
    manifest_of,
    require_wheelhouse,
    run_bundler,
    write_spec,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    require_wheelhouse("mdurl-0.1.2-*.whl", "click-*.whl", "cryptography-*.whl")
    root = tmp_path_factory.mktemp("build")
    key, fingerprint = make_key(root / "key")
    # The project's own wheel (no extras: its base dependencies are small) plus one pinned wheel.
    spec = write_spec(root / "spec.toml", project=True, extras="")
    first = build(spec, key, root / "first")
    second = build(spec, key, root / "second")
    newer = build(write_spec(root / "newer.toml", version="0.2.0", sequence=2, requirements=()), key, root / "newer")
    return {"root": root, "key": key, "fp": fingerprint, "first": first, "second": second, "newer": newer}


def test_keygen_writes_an_encrypted_owner_only_key_and_refuses_to_overwrite(built):
    private = built["key"]
    assert private.read_text().startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert private.stat().st_mode & 0o777 == 0o600
    again = run_bundler("keygen", "--out", str(private.parent))
    assert again.returncode == 2 and "already exists" in again.stderr


def test_same_spec_and_inputs_give_the_same_manifest_apart_from_created(built):
    a, b = manifest_of(built["first"]), manifest_of(built["second"])
    assert a.pop("created") and b.pop("created")
    assert a == b
    assert any(f["path"].startswith("wheels/airlock-0.1.0-") for f in a["files"])


def test_manifest_lists_parts_and_whole_and_every_file(built):
    manifest = manifest_of(built["first"])
    split = next(s for s in manifest["split_files"] if s["path"] == "models/tiny-deepseek-r1/model.safetensors")
    count = -(-(TINY_MODEL / "model.safetensors").stat().st_size // SPLIT_BYTES)
    assert count > 1
    assert split["parts"] == [f"{split['path']}.part{i:03d}" for i in range(count)]
    sizes = {f["path"]: f["size"] for f in manifest["files"]}
    assert all(sizes[p] <= SPLIT_BYTES for p in split["parts"])
    assert sum(sizes[p] for p in split["parts"]) == split["size"]
    on_disk = {p.relative_to(built["first"]).as_posix() for p in built["first"].rglob("*") if p.is_file()}
    assert on_disk == set(sizes) | {"MANIFEST.json", "MANIFEST.json.sig", "signer.pub.pem"}
    lock = (built["first"] / "wheels" / "requirements.lock").read_text()
    assert "mdurl==0.1.2 --hash=sha256:" in lock and "airlock==0.1.0 --hash=sha256:" in lock


def test_readme_manual_checks_of_install_sh_work(built):
    """The two commands README.md gives for checking install.sh before running it."""
    bundle, public = built["first"], built["key"].parent / "signing-key.pub.pem"
    verified = subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(public), "-signature",
                               "MANIFEST.json.sig", "MANIFEST.json"], cwd=bundle, capture_output=True, text=True,
                              check=False)
    assert verified.returncode == 0 and "Verified OK" in verified.stdout
    digest = subprocess.run(["sha256sum", "install.sh"], cwd=bundle, capture_output=True, text=True,
                            check=True).stdout.split()[0]
    assert f'{{"path":"install.sh","sha256":"{digest}"' in (bundle / "MANIFEST.json").read_text()
    fingerprint = subprocess.run(f"openssl pkey -pubin -in {public} -outform DER | sha256sum", shell=True,  # noqa: S602
                                 capture_output=True, text=True, check=True).stdout.split()[0]
    assert fingerprint == built["fp"]


def test_verify_inspect_and_diff_json(built):
    verified = run_bundler("verify", str(built["first"]), "--trust", built["fp"], "--json")
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["ok"] is True
    info = json.loads(run_bundler("inspect", str(built["first"]), "--json").stdout)
    assert info["target"]["platforms"][0] == "manylinux_2_28_x86_64"
    assert info["wheels"]["mdurl"]["version"] == "0.1.2"
    assert info["sbom"] == {"libraries": len(info["wheels"]), "models": 1}
    assert info["models"]["tiny-deepseek-r1"]["model.safetensors"] == (TINY_MODEL / "model.safetensors").stat().st_size
    diff = json.loads(run_bundler("diff", str(built["first"]), str(built["newer"]), "--json").stdout)
    assert diff["version"] == ["0.1.0", "0.2.0"] and diff["sequence"] == [1, 2]
    assert "mdurl" in diff["wheels_removed"] and diff["models_changed"] == []
    assert run_bundler("inspect", str(built["first"])).stdout.startswith("airlock 0.1.0  sequence 1")


def test_sbom_is_cyclonedx_with_every_wheel_and_model(built):
    sbom = json.loads((built["first"] / "sbom.cdx.json").read_text())
    assert sbom["bomFormat"] == "CycloneDX" and sbom["specVersion"] == "1.5"
    names = {c["name"] for c in sbom["components"]}
    assert {"mdurl", "airlock", "click", "tiny-deepseek-r1"} <= names


def test_key_rotation_is_accepted_only_through_the_old_keys_statement(built, tmp_path):
    new_key, new_fp = make_key(tmp_path / "new-key")
    spec = write_spec(tmp_path / "spec.toml", version="0.3.0", sequence=3, requirements=())
    plain = build(spec, new_key, tmp_path / "plain")
    refused = run_bundler("verify", str(plain), "--trust", built["fp"])
    assert refused.returncode == 2 and "not trusted" in refused.stderr
    rotated = build(spec, new_key, tmp_path / "rotated", "--rotate-from", str(built["key"]))
    accepted = run_bundler("verify", str(rotated), "--trust", built["fp"])
    assert accepted.returncode == 0, accepted.stderr
    assert f"vouched for by trusted key {built['fp']}" in accepted.stdout
    assert manifest_of(rotated)["signer"] == new_fp


def test_stub_sdist_is_refused_with_where_to_fetch_the_wheel(tmp_path, built):
    links = tmp_path / "links"
    links.mkdir()
    # The shape of the public tensorrt-cu12 package: an sdist whose setup.py downloads at install time.
    source = tmp_path / "tensorrt_cu12-10.13.3.9"
    source.mkdir()
    (source / "setup.py").write_text("from setuptools import setup\nsetup(name='tensorrt_cu12', version='10.13.3.9')\n")
    with tarfile.open(links / "tensorrt_cu12-10.13.3.9.tar.gz", "w:gz") as archive:
        archive.add(source, arcname=source.name)
    spec = write_spec(tmp_path / "spec.toml", requirements=("tensorrt-cu12==10.13.3.9",), find_links=links)
    result = run_bundler("build", str(spec), "--key", str(built["key"]), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "tensorrt-cu12 has no wheel for the target" in result.stderr
    assert "https://pypi.nvidia.com" in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize(("change", "message"), [
    ('requirements = ["torch>=2"]', "is not pinned as name==version"),
    ("sequence = 0", "spec field sequence"),
    ('platform = "linux_x86_64"', "spec field target.platform"),
])
def test_bad_spec_names_the_file_and_field(tmp_path, built, change, message):
    spec = write_spec(tmp_path / "spec.toml")
    key = change.split(" = ")[0]
    lines = [change if line.startswith(f"{key} = ") else line for line in spec.read_text().splitlines()]
    spec.write_text("\n".join(lines) + "\n")
    result = run_bundler("build", str(spec), "--key", str(built["key"]), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert str(spec) in result.stderr and message in result.stderr


def test_wheelhouse_is_offline_material():
    assert (WHEELHOUSE / ".downloaded").exists() or any(WHEELHOUSE.glob("*.whl"))


def test_file_names_outside_the_manifest_alphabet_are_refused_at_build(tmp_path, built):
    odd = tmp_path / "model"
    odd.mkdir()
    for source in TINY_MODEL.iterdir():
        (odd / source.name).write_bytes(source.read_bytes())
    (odd / "model.safetensors").rename(odd / "my weights.safetensors")
    result = run_bundler("build", str(write_spec(tmp_path / "spec.toml", model=odd)), "--key", str(built["key"]),
                         "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "models/tiny-deepseek-r1/my weights.safetensors: this file name cannot ship" in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_project_wheel_leaves_out_modules_only_stale_build_state_still_holds(tmp_path):
    """setuptools reuses build/lib/: a module deleted from the tree must not ship from there."""
    import zipfile

    from bundler.wheels import build_project_wheel

    project = tmp_path / "proj"
    (project / "pkg").mkdir(parents=True)
    (project / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools"]\n'
                                            'build-backend = "setuptools.build_meta"\n'
                                            '[project]\nname = "proj"\nversion = "1.0"\n'
                                            '[tool.setuptools]\npackages = ["pkg"]\n')
    (project / "pkg" / "__init__.py").write_text("")
    stale = project / "build" / "lib" / "pkg"
    stale.mkdir(parents=True)
    (stale / "__init__.py").write_text("")
    (stale / "deleted.py").write_text("GONE = True\n")  # what an earlier in-tree build left behind

    wheel = build_project_wheel(project, tmp_path / "out")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pkg/__init__.py" in names
    assert "pkg/deleted.py" not in names
    assert (stale / "deleted.py").exists()  # the project's own tree is left as it was
