"""`airlock-bundle`: the build station's command line (keygen, build, verify, inspect, diff).

Runs on a connected build station without torch or a GPU. `verify`, `inspect` and `diff` take
`--json` (keys documented in docs/cli-json.md).
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any

import click

from bundler.errors import run_cli

VERSION = "0.1.0"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(VERSION, prog_name="airlock-bundle")
def cli(debug: bool) -> None:
    """Airlock build station: pack wheels, models and the appliance into a signed offline bundle."""


def _echo_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def trusted_fingerprints(values: tuple[str, ...]) -> frozenset[str]:
    """--trust takes fingerprints (64 hex, colons allowed) or public key PEM files."""
    from bundler.manifest import fingerprint, load_public_key, normalize_fingerprint

    result = set()
    for value in values:
        path = Path(value)
        if path.is_file():
            result.add(fingerprint(load_public_key(path.read_bytes(), str(path))))
        else:
            result.add(normalize_fingerprint(value))
    return frozenset(result)


@cli.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Directory for the key pair.")
def keygen(out_dir: Path) -> None:
    """Create a signing key pair; the private key is encrypted with a passphrase.

    Write the printed fingerprint on the site's paper record: installs pin it with --trust.
    """
    from bundler.signing import generate_key, read_passphrase

    pair = generate_key(out_dir, read_passphrase(confirm=True))
    click.echo(f"private key: {pair.private_path} (encrypted; keep it offline)")
    click.echo(f"public key:  {pair.public_path}")
    click.echo(f"fingerprint: {pair.fingerprint}")


@cli.command()
@click.argument("spec_path", metavar="SPEC.toml", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--key", "key_path", type=click.Path(path_type=Path), required=True, help="Encrypted private key.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="New bundle directory.")
@click.option("--rotate-from", type=click.Path(path_type=Path),
              help="The currently trusted private key: adds a statement that it vouches for --key.")
@click.option("--split-size", type=click.IntRange(min=1), default=None,
              help="Split files larger than this many bytes (default 3.9 GiB, for FAT32 sticks).")
@click.option("--differential-from", "base_path", type=click.Path(path_type=Path, exists=True),
              help="An earlier bundle (or its MANIFEST.json): ship only wheels and model files it did not have; "
                   "the target must have that bundle installed.")
def build(spec_path: Path, key_path: Path, out_dir: Path, rotate_from: Path | None, split_size: int | None,
          base_path: Path | None) -> None:
    """Build and sign a bundle from a spec."""
    import os

    from bundler.build import build_bundle, load_base_manifest
    from bundler.signing import load_private_key, read_passphrase
    from bundler.spec import load_spec
    from bundler.split import DEFAULT_SPLIT_BYTES

    spec = load_spec(spec_path)
    base = load_base_manifest(base_path) if base_path is not None else None
    key = load_private_key(key_path, read_passphrase())
    old_key = None
    if rotate_from is not None:
        old_pass = os.environ.get("AIRLOCK_OLD_SIGNING_PASSPHRASE")
        old_key = load_private_key(rotate_from, old_pass.encode() if old_pass is not None else
                                   click.prompt("passphrase of the old key", hide_input=True).encode())
    result = build_bundle(spec, key, out_dir, split_bytes=split_size or DEFAULT_SPLIT_BYTES, rotate_from=old_key,
                          differential_from=base)
    click.echo(f"bundle: {result.directory} ({result.files} files, {result.payload_bytes / 2**20:.1f} MiB)")
    if base is not None:
        click.echo(f"differential over {base.product} {base.version} (bundle id {base.bundle_id}): {result.held_files} "
                   f"files held by the installed base; ships {result.payload_bytes / 2**20:.1f} of "
                   f"{result.full_bytes / 2**20:.1f} MiB ({result.payload_bytes / max(result.full_bytes, 1):.1%})")
    click.echo(f"product {spec.product} {spec.version}, sequence {spec.sequence}, signed by {result.fingerprint}")
    from bundler.wheels import optional_present

    for requirement in optional_present(spec)[1]:
        click.echo(f"note: optional {requirement} not shipped: no wheel of it in wheels.find_links")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--trust", "trust", multiple=True, required=True, metavar="FINGERPRINT|PUBKEY",
              help="Pinned signing key: fingerprint or public key file (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def verify(bundle: Path, trust: tuple[str, ...], as_json: bool) -> None:
    """Verify signature, trust, and every file's size and SHA-256. Exits 2 at the first problem."""
    from bundler.manifest import verify_bundle

    manifest = verify_bundle(bundle, trusted_fingerprints(trust))
    summary = {"ok": True, "product": manifest.product, "version": manifest.version, "sequence": manifest.sequence,
               "bundle_id": manifest.bundle_id, "signer": manifest.signer, "files": len(manifest.files),
               "payload_bytes": manifest.payload_bytes,
               "key_rotation": None if manifest.key_rotation is None else manifest.key_rotation.old_fingerprint}
    if as_json:
        _echo_json(summary)
        return
    click.echo(f"OK: {manifest.product} {manifest.version} (sequence {manifest.sequence}), {len(manifest.files)} "
               f"files, {manifest.payload_bytes / 2**20:.1f} MiB, signed by {manifest.signer}")
    if manifest.key_rotation:
        click.echo(f"key rotation: vouched for by trusted key {manifest.key_rotation.old_fingerprint}")
    if manifest.differential:
        click.echo(f"differential over {manifest.product} {manifest.differential.base_version} (bundle id "
                   f"{manifest.differential.base_bundle_id}): {len(manifest.differential.held)} files come from that "
                   "installed release and are checked there at install")


def _describe(bundle: Path) -> dict[str, Any]:
    """The bundle's contents, checked only against its own key (trust is `verify`'s job)."""
    from bundler.manifest import (
        MANIFEST_NAME,
        MAX_KEY_BYTES,
        MAX_MANIFEST_BYTES,
        MAX_SIGNATURE_BYTES,
        SIGNATURE_NAME,
        SIGNER_KEY_NAME,
        fingerprint,
        load_public_key,
        read_root_file,
        verify_manifest,
    )
    from bundler.sbom import summarize_sbom
    from bundler.wheels import parse_wheel_name

    key_pem = read_root_file(bundle, SIGNER_KEY_NAME, MAX_KEY_BYTES)
    own = fingerprint(load_public_key(key_pem))
    manifest = verify_manifest(read_root_file(bundle, MANIFEST_NAME, MAX_MANIFEST_BYTES),
                               read_root_file(bundle, SIGNATURE_NAME, MAX_SIGNATURE_BYTES), key_pem,
                               {own}, today=date(1970, 1, 1))
    whole = {f.path: f.size for f in manifest.files}
    whole.update({s.path: s.size for s in manifest.split_files})
    for split in manifest.split_files:
        for part in split.parts:
            whole.pop(part, None)
    wheels = {}
    for path in sorted(whole):
        if path.startswith("wheels/") and path.endswith(".whl"):
            name, version, _ = parse_wheel_name(path.removeprefix("wheels/"))
            wheels[name] = {"version": version, "file": path, "size": whole[path]}
    models = {m.name: {p.removeprefix(m.path + "/"): whole[p] for p in sorted(whole) if p.startswith(m.path + "/")}
              for m in manifest.models}
    sbom_path = bundle / manifest.sbom
    sbom = summarize_sbom(sbom_path.read_bytes()) if sbom_path.is_file() and not sbom_path.is_symlink() else {}
    return {"product": manifest.product, "version": manifest.version, "sequence": manifest.sequence,
            "bundle_id": manifest.bundle_id, "created": manifest.created, "expires": manifest.expires,
            "signer": manifest.signer,
            "target": {"arch": manifest.target.arch, "python_version": manifest.target.python_version,
                       "glibc_min": manifest.target.glibc_min, "cuda_major": manifest.target.cuda_major,
                       "min_driver": manifest.target.min_driver, "platforms": list(manifest.target.platforms)},
            "payload_bytes": manifest.payload_bytes, "split_files": [s.path for s in manifest.split_files],
            "wheels": wheels, "models": models, "sbom": sbom}


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def inspect(bundle: Path, as_json: bool) -> None:
    """Show a bundle's target, wheels, models, sizes and SBOM summary (no trust check: use verify)."""
    info = _describe(bundle)
    if as_json:
        _echo_json(info)
        return
    target = info["target"]
    click.echo(f"{info['product']} {info['version']}  sequence {info['sequence']}  created {info['created']}  "
               f"expires {info['expires']}")
    click.echo(f"signer {info['signer']} (not checked against a pin: run `verify --trust`)")
    click.echo(f"target: {target['arch']}, Python {target['python_version']}, glibc >= {target['glibc_min']}, "
               + (f"CUDA {target['cuda_major']} (driver >= {target['min_driver']})" if target["cuda_major"]
                  else "CPU only"))
    wheels, models = info["wheels"], info["models"]
    click.echo(f"wheels ({len(wheels)}):")
    for name, wheel in wheels.items():
        click.echo(f"  {name:<32} {wheel['version']:<20} {wheel['size'] / 2**20:9.1f} MiB")
    for name, files in models.items():
        click.echo(f"model {name}: " + ", ".join(f"{f} ({size / 2**20:.1f} MiB)" for f, size in files.items()))
    if info["split_files"]:
        click.echo(f"split for FAT32: {', '.join(info['split_files'])}")
    click.echo(f"SBOM: {info['sbom']}; payload {int(info['payload_bytes']) / 2**20:.1f} MiB")


@cli.command()
@click.argument("old", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("new", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def diff(old: Path, new: Path, as_json: bool) -> None:
    """What changes between two bundles: version, sequence, target, wheels, model files."""
    a, b = _describe(old), _describe(new)
    wa, wb = a["wheels"], b["wheels"]
    result: dict[str, Any] = {
        "version": [a["version"], b["version"]], "sequence": [a["sequence"], b["sequence"]],
        "target_changed": a["target"] != b["target"], "signer_changed": a["signer"] != b["signer"],
        "wheels_added": {n: wb[n]["version"] for n in sorted(set(wb) - set(wa))},
        "wheels_removed": {n: wa[n]["version"] for n in sorted(set(wa) - set(wb))},
        "wheels_changed": {n: [wa[n]["version"], wb[n]["version"]] for n in sorted(set(wa) & set(wb))
                           if wa[n] != wb[n]},
        "models_changed": sorted(n for n in set(a["models"]) | set(b["models"])
                                 if a["models"].get(n) != b["models"].get(n)),
    }
    if as_json:
        _echo_json(result)
        return
    click.echo(f"version {a['version']} -> {b['version']}, sequence {a['sequence']} -> {b['sequence']}")
    if result["target_changed"]:
        click.echo(f"target: {a['target']} -> {b['target']}")
    if result["signer_changed"]:
        click.echo(f"signer: {a['signer']} -> {b['signer']}")
    for name, version in result["wheels_added"].items():
        click.echo(f"+ {name} {version}")
    for name, version in result["wheels_removed"].items():
        click.echo(f"- {name} {version}")
    for name, (before, after) in result["wheels_changed"].items():
        click.echo(f"~ {name} {before} -> {after}")
    for name in result["models_changed"]:
        click.echo(f"~ model {name}")
    if not any(result[k] for k in ("wheels_added", "wheels_removed", "wheels_changed", "models_changed")):
        click.echo("no wheel or model changes")


def main() -> None:
    run_cli(cli, "airlock-bundle")


if __name__ == "__main__":
    main()
