"""The SBOM names each wheel's declared license: the DICOM decoders' among them (one is GPLv3)."""

from __future__ import annotations

import json

from bundler.sbom import build_sbom
from bundler.wheels import Wheel, parse_wheel_name, wheel_license
from tests.bundler.bundles import WHEELHOUSE, require_wheelhouse


def test_declared_licenses_reach_the_sbom():
    require_wheelhouse("pylibjpeg_libjpeg-*.whl", "pyjpegls-*.whl", "pylibjpeg_rle-*.whl", "mdurl-*.whl")
    wheels = []
    for pattern in ("pylibjpeg_libjpeg-*.whl", "pyjpegls-*.whl", "pylibjpeg_rle-*.whl", "mdurl-*.whl"):
        path = next(WHEELHOUSE.glob(pattern))
        name, version, _ = parse_wheel_name(path.name)
        wheels.append(Wheel(path.name, name, version, "0" * 64, path.stat().st_size, wheel_license(path)))
    licenses = {w.name: w.license for w in wheels}
    assert "GPL" in licenses["pylibjpeg-libjpeg"] and licenses["pyjpegls"] == "MIT"
    assert licenses["pylibjpeg-rle"] == "MIT" and licenses["mdurl"]  # License-Expression / License / classifiers
    sbom = json.loads(build_sbom("airlock", "0.1.0", wheels, []))
    declared = {c["name"]: c["licenses"][0]["license"]["name"] for c in sbom["components"] if "licenses" in c}
    assert declared == licenses


def test_a_wheel_without_metadata_has_no_license(tmp_path):
    import zipfile

    path = tmp_path / "x-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x/__init__.py", "")
    assert wheel_license(path) == "" and wheel_license(tmp_path / "missing.whl") == ""
    sbom = json.loads(build_sbom("airlock", "0.1.0", [Wheel(path.name, "x", "1.0", "0" * 64, 1)], []))
    assert "licenses" not in sbom["components"][0]
