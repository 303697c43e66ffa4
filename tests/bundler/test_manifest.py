"""The trust-critical core: bytes in, verified Manifest out, in a fixed order (real ECDSA keys)."""

from __future__ import annotations

import base64
import json
from datetime import date

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from bundler.errors import BundleError
from bundler.manifest import canonical_json, check_path, fingerprint, rotation_record, verify_manifest
from bundler.signing import public_pem, sign

SHA = "ab" * 32


@pytest.fixture(scope="module")
def keys():
    return ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())


def _body(key, **changes) -> dict:
    body = {
        "bundle_id": "cd" * 32, "created": "2026-11-22T14:00:00Z", "expires": "2099-12-31",
        "files": [{"path": "install.sh", "sha256": SHA, "size": 10},
                  {"path": "sbom.cdx.json", "sha256": SHA, "size": 5},
                  {"path": "wheels/requirements.lock", "sha256": SHA, "size": 1}],
        "format": "airlock-bundle/1", "key_rotation": None, "lock": "wheels/requirements.lock", "models": [],
        "product": "airlock", "sbom": "sbom.cdx.json", "sequence": 3, "signer": fingerprint(key.public_key()),
        "split_files": [],
        "target": {"arch": "x86_64", "cuda_major": 12, "glibc_min": "2.28", "min_driver": 525,
                   "platforms": ["manylinux_2_28_x86_64", "manylinux2014_x86_64"], "python_version": "3.11"},
        "version": "1.2.0",
    }
    body.update(changes)
    return body


def _signed(key, body: dict) -> tuple[bytes, bytes, bytes]:
    data = canonical_json(body)
    return data, sign(key, data), public_pem(key.public_key())


def _verify(key, body: dict, trusted=None, **kwargs):
    return verify_manifest(*_signed(key, body), trusted if trusted is not None else {fingerprint(key.public_key())},
                           **kwargs)


def test_valid_manifest_verifies_into_frozen_objects(keys):
    manifest = _verify(keys[0], _body(keys[0]))
    assert (manifest.product, manifest.version, manifest.sequence) == ("airlock", "1.2.0", 3)
    assert manifest.target.min_driver == 525
    assert manifest.payload_bytes == 16
    with pytest.raises(AttributeError):
        manifest.sequence = 4  # type: ignore[misc]


def test_signature_is_checked_before_anything_is_parsed(keys):
    data, signature, pem = _signed(keys[0], _body(keys[0]))
    garbage = b"{not json" + data
    with pytest.raises(BundleError, match="signature does not verify"):
        verify_manifest(garbage, signature, pem, {fingerprint(keys[0].public_key())})


def test_untrusted_signer_is_refused(keys):
    with pytest.raises(BundleError, match="not trusted"):
        _verify(keys[0], _body(keys[0]), trusted={fingerprint(keys[1].public_key())})


@pytest.mark.parametrize("path", ["../etc/passwd", "/etc/passwd", "models\\x", "a/../b", "a//b", ".hidden",
                                  "a b", "x" * 300, "models/.git/config", "-rf"])
def test_unsafe_paths_are_refused(path):
    with pytest.raises(BundleError):
        check_path(path)


def test_duplicate_paths_and_keys_are_refused(keys):
    body = _body(keys[0])
    body["files"].append(dict(body["files"][0]))
    with pytest.raises(BundleError, match="listed twice"):
        _verify(keys[0], body)
    data = canonical_json(_body(keys[0])).replace(b'{"bundle_id"', b'{"version":"9","bundle_id"', 1)
    with pytest.raises(BundleError, match=r"duplicate key|canonical"):
        verify_manifest(data, sign(keys[0], data), public_pem(keys[0].public_key()),
                        {fingerprint(keys[0].public_key())})


def test_non_canonical_json_is_refused_even_when_signed(keys):
    data = json.dumps(_body(keys[0]), indent=1).encode()
    with pytest.raises(BundleError, match="canonical"):
        verify_manifest(data, sign(keys[0], data), public_pem(keys[0].public_key()),
                        {fingerprint(keys[0].public_key())})


def test_unknown_keys_and_bad_types_are_refused(keys):
    with pytest.raises(BundleError, match="expected keys"):
        _verify(keys[0], _body(keys[0], extra="x"))
    with pytest.raises(BundleError, match="bad number"):
        _verify(keys[0], _body(keys[0], sequence=True))
    with pytest.raises(BundleError, match="bad number"):
        _verify(keys[0], _body(keys[0], sequence=-1))


def test_expired_bundle_is_refused(keys):
    with pytest.raises(BundleError, match="expired on 2099-12-31"):
        _verify(keys[0], _body(keys[0]), today=date(2100, 1, 1))


def test_key_rotation_statement_from_the_trusted_key_is_accepted(keys):
    old, new = keys
    body = _body(new, key_rotation=rotation_record(old, fingerprint(new.public_key()), "airlock"))
    manifest = _verify(new, body, trusted={fingerprint(old.public_key())})
    assert manifest.key_rotation is not None
    assert manifest.key_rotation.old_fingerprint == fingerprint(old.public_key())


def test_key_rotation_statement_must_be_signed_by_a_trusted_key_for_this_signer_and_product(keys):
    old, new = keys
    stranger = ec.generate_private_key(ec.SECP256R1())
    trusted = {fingerprint(old.public_key())}
    forged = _body(new, key_rotation=rotation_record(stranger, fingerprint(new.public_key()), "airlock"))
    with pytest.raises(BundleError, match="not trusted either"):
        _verify(new, forged, trusted=trusted)
    other_product = _body(new, key_rotation=rotation_record(old, fingerprint(new.public_key()), "other"))
    with pytest.raises(BundleError, match="another key or product"):
        _verify(new, other_product, trusted=trusted)
    record = rotation_record(old, fingerprint(new.public_key()), "airlock")
    record["signature"] = base64.b64encode(sign(stranger, b"x")).decode()
    with pytest.raises(BundleError, match="statement signature does not verify"):
        _verify(new, _body(new, key_rotation=record), trusted=trusted)


def test_lengths_are_capped(keys):
    with pytest.raises(BundleError, match="not an ECDSA signature"):
        verify_manifest(b"{}", b"x" * 1000, public_pem(keys[0].public_key()), set())
    with pytest.raises(BundleError, match="over"):
        verify_manifest(b" " * (16 * 2**20 + 1), b"x" * 70, public_pem(keys[0].public_key()), set())


def test_non_p256_key_is_refused():
    from cryptography.hazmat.primitives.asymmetric import ed25519

    pem = public_pem(ed25519.Ed25519PrivateKey.generate().public_key())  # type: ignore[arg-type]
    with pytest.raises(BundleError, match="not an ECDSA P-256"):
        verify_manifest(b"{}", b"x" * 70, pem, set())


def _differential_body(key, **differential) -> dict:
    body = _body(key)
    body["files"] += [{"path": "models/m/model.safetensors", "sha256": SHA, "size": 7},
                      {"path": "wheels/a-1.0-py3-none-any.whl", "sha256": SHA, "size": 3}]
    body["files"].sort(key=lambda f: f["path"])
    body["differential"] = {"base_bundle_id": "ef" * 32, "base_version": "1.1.0",
                            "held": ["models/m/model.safetensors", "wheels/a-1.0-py3-none-any.whl"], **differential}
    return body


def test_a_differential_manifest_lists_every_file_and_marks_the_held_ones(keys):
    manifest = _verify(keys[0], _differential_body(keys[0]))
    assert manifest.differential is not None and manifest.differential.base_version == "1.1.0"
    assert [f.path for f in manifest.held_entries()] == ["models/m/model.safetensors", "wheels/a-1.0-py3-none-any.whl"]
    # The stick carries 16 bytes; the release installs from 26.
    assert (manifest.payload_bytes, manifest.full_bytes) == (16, 26)
    # A full bundle's manifest has no differential key at all (what releases before ADR 0018 verify).
    assert _verify(keys[0], _body(keys[0])).differential is None


@pytest.mark.parametrize(("held", "message"), [
    (["install.sh"], "held file is not a listed wheel or model file"),  # the installer always ships
    (["wheels/requirements.lock"], "held file is not a listed wheel or model file"),
    (["wheels/b-2.0-py3-none-any.whl"], "held file is not a listed wheel or model file"),  # not listed
    (["wheels/a-1.0-py3-none-any.whl", "models/m/model.safetensors"], "sorted and unique"),
    (["models/m/model.safetensors", "models/m/model.safetensors"], "sorted and unique"),
])
def test_a_differential_manifest_holds_only_listed_wheels_and_models(keys, held, message):
    with pytest.raises(BundleError, match=message):
        _verify(keys[0], _differential_body(keys[0], held=held))


def test_a_differential_manifest_never_holds_a_part_of_a_split_file(keys):
    body = _differential_body(keys[0], held=["models/m/w.safetensors.part000"])
    body["files"] += [{"path": "models/m/w.safetensors.part000", "sha256": SHA, "size": 4}]
    body["files"].sort(key=lambda f: f["path"])
    body["split_files"] = [{"parts": ["models/m/w.safetensors.part000"], "path": "models/m/w.safetensors",
                            "sha256": SHA, "size": 4}]
    with pytest.raises(BundleError, match="held file is not a listed wheel or model file"):
        _verify(keys[0], body)
