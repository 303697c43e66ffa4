"""Tamper matrix: every altered bundle is refused by install.sh (openssl + sha256sum) and by
`airlock-bundle verify` (Python), with one line naming the file, and nothing is installed.

Bundles here hold one tiny wheel and the tiny model (split in three parts), so refusals are fast;
the full install is tests/e2e/test_bundle_install.py.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.bundler.bundles import (
    TINY_MODEL,
    build,
    copy_bundle,
    make_key,
    manifest_of,
    require_wheelhouse,
    resign,
    run_bundler,
    write_spec,
)

MODEL_DIR = "models/tiny-deepseek-r1"
WHEEL = "wheels/mdurl-0.1.2-py3-none-any.whl"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    require_wheelhouse("mdurl-0.1.2-*.whl")
    root = tmp_path_factory.mktemp("tamper")
    key, fingerprint = make_key(root / "key")
    other_key, other_fingerprint = make_key(root / "other-key")
    bundle = build(write_spec(root / "a.toml"), key, root / "bundle-a")
    # Bundle B: same layout, one byte of the model changed, so its parts differ from A's.
    model_b = root / "model-b"
    model_b.mkdir()
    for source in TINY_MODEL.iterdir():
        (model_b / source.name).write_bytes(source.read_bytes())
    weights = bytearray((model_b / "model.safetensors").read_bytes())
    weights[5_000_000] ^= 0xFF
    (model_b / "model.safetensors").write_bytes(bytes(weights))
    bundle_b = build(write_spec(root / "b.toml", model=model_b), key, root / "bundle-b")
    arm = build(write_spec(root / "arm.toml", platform="manylinux_2_28_aarch64"), key, root / "bundle-arm")
    return {"root": root, "key": key, "fp": fingerprint, "other_key": other_key, "other_fp": other_fingerprint,
            "a": bundle, "b": bundle_b, "arm": arm}


def _flip(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _rewrite_path(old: str, new: str) -> Callable[[Path, dict], None]:
    def mutate(bundle: Path, world: dict) -> None:
        manifest = manifest_of(bundle)
        for entry in manifest["files"]:
            if entry["path"] == old:
                entry["path"] = new
        manifest["files"].sort(key=lambda e: e["path"])
        resign(bundle, world["key"], manifest)
    return mutate


def _expire(bundle: Path, world: dict) -> None:
    manifest = manifest_of(bundle)
    manifest["expires"] = "2020-01-01"
    resign(bundle, world["key"], manifest)


def _symlink(bundle: Path, world: dict) -> None:
    target = bundle / MODEL_DIR / "config.json"
    outside = world["root"] / f"outside-{os.getpid()}-{id(bundle)}.json"
    outside.write_bytes(target.read_bytes())
    target.unlink()
    target.symlink_to(outside)


def _mix(bundle: Path, world: dict) -> None:
    name = f"{MODEL_DIR}/model.safetensors.part001"
    (bundle / name).write_bytes((world["b"] / name).read_bytes())


def _truncate(bundle: Path, world: dict) -> None:
    part = bundle / MODEL_DIR / "model.safetensors.part000"
    part.write_bytes(part.read_bytes()[:1000])


CASES: dict[str, tuple[Callable[[Path, dict], None], str]] = {
    "flipped byte in a wheel": (lambda b, w: _flip(b / WHEEL), WHEEL),
    "flipped byte in a model shard": (lambda b, w: _flip(b / MODEL_DIR / "model.safetensors.part001"),
                                      "model.safetensors.part001"),
    "flipped byte in the manifest": (lambda b, w: _flip(b / "MANIFEST.json", 200), "MANIFEST.json"),
    "flipped byte in the signature": (lambda b, w: _flip(b / "MANIFEST.json.sig", 20), "MANIFEST.json"),
    "missing file": (lambda b, w: (b / MODEL_DIR / "tokenizer.json").unlink(), f"{MODEL_DIR}/tokenizer.json"),
    "extra file": (lambda b, w: (b / "wheels" / "evil-1.0-py3-none-any.whl").write_bytes(b"PK"),
                   "wheels/evil-1.0-py3-none-any.whl"),
    "renamed file": (lambda b, w: (b / MODEL_DIR / "config.json").rename(b / MODEL_DIR / "config.json.bak"),
                     "config.json"),
    "part from another bundle": (_mix, "model.safetensors.part001"),
    "truncated part": (_truncate, "model.safetensors.part000"),
    "symlink in place of a file": (_symlink, f"{MODEL_DIR}/config.json"),
    "'..' path in the manifest": (_rewrite_path(f"{MODEL_DIR}/tokenizer.json", "models/../../escape.json"),
                                  "escape.json"),
    "absolute path in the manifest": (_rewrite_path(f"{MODEL_DIR}/tokenizer.json", "/etc/airlock-escape.json"),
                                      "/etc/airlock-escape.json"),
    "expired bundle": (_expire, "expired"),
}


def _install(bundle: Path, trust: str, prefix: Path, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(bundle / "install.sh"), "--trust", trust, "--prefix", str(prefix), "--home", str(home)],
                          capture_output=True, text=True, timeout=120, check=False)


def _assert_refused(result: subprocess.CompletedProcess[str], expected: str, prefix: Path, home: Path) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("install.sh: REFUSED: ") and expected in lines[0], lines[0]
    assert not prefix.exists() and not home.exists(), "a refused bundle must install nothing"


@pytest.mark.parametrize("case", list(CASES))
def test_install_sh_refuses_tampered_bundle(world, tmp_path, case):
    mutate, expected = CASES[case]
    bundle = copy_bundle(world["a"], tmp_path / "bundle")
    mutate(bundle, world)
    _assert_refused(_install(bundle, world["fp"], tmp_path / "prefix", tmp_path / "home"), expected,
                    tmp_path / "prefix", tmp_path / "home")


@pytest.mark.parametrize("case", list(CASES))
def test_python_verify_refuses_tampered_bundle(world, tmp_path, case):
    mutate, expected = CASES[case]
    bundle = copy_bundle(world["a"], tmp_path / "bundle")
    mutate(bundle, world)
    result = run_bundler("verify", str(bundle), "--trust", world["fp"])
    assert result.returncode == 2
    first = result.stderr.strip().splitlines()[0]
    assert first.startswith("error: ") and expected.removeprefix("models/..") in first, first


def test_untrusted_key_is_refused(world, tmp_path):
    _assert_refused(_install(world["a"], world["other_fp"], tmp_path / "prefix", tmp_path / "home"),
                    "signer.pub.pem", tmp_path / "prefix", tmp_path / "home")
    result = run_bundler("verify", str(world["a"]), "--trust", world["other_fp"])
    assert result.returncode == 2
    assert "signer.pub.pem" in result.stderr and "not trusted" in result.stderr


def test_bundle_resigned_by_another_key_is_refused(world, tmp_path):
    bundle = copy_bundle(world["a"], tmp_path / "bundle")
    manifest = manifest_of(bundle)
    other_pub = (world["other_key"].parent / "signing-key.pub.pem").read_bytes()
    (bundle / "signer.pub.pem").write_bytes(other_pub)
    manifest["signer"] = world["other_fp"]
    resign(bundle, world["other_key"], manifest)
    _assert_refused(_install(bundle, world["fp"], tmp_path / "prefix", tmp_path / "home"), "signer.pub.pem",
                    tmp_path / "prefix", tmp_path / "home")


def test_bundle_for_another_cpu_is_refused_at_preflight(world, tmp_path):
    result = _install(world["arm"], world["fp"], tmp_path / "prefix", tmp_path / "home")
    _assert_refused(result, "cpu arch", tmp_path / "prefix", tmp_path / "home")
    assert "aarch64" in result.stderr and "check" in result.stdout  # the preflight table came first


def test_untampered_bundle_verifies(world):
    result = run_bundler("verify", str(world["a"]), "--trust", world["fp"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK: airlock 0.1.0 (sequence 1)")


def test_trust_takes_a_public_key_file_too(world, tmp_path):
    other_pub = world["other_key"].parent / "signing-key.pub.pem"
    result = _install(world["a"], str(other_pub), tmp_path / "prefix", tmp_path / "home")
    _assert_refused(result, f"is not the trusted key {world['other_fp']}", tmp_path / "prefix", tmp_path / "home")
    garbage = tmp_path / "not-a-key.pem"
    garbage.write_text("hello\n")
    _assert_refused(_install(world["a"], str(garbage), tmp_path / "prefix", tmp_path / "home"),
                    "not a PEM public key", tmp_path / "prefix", tmp_path / "home")
