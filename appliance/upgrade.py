"""`airlock upgrade`: install a newer signed bundle, or roll back to the previous release.

    airlock upgrade /media/usb/airlock-0.2.0      verify with the stored key, then install
    airlock upgrade --rollback                    switch PREFIX/current back to PREFIX/previous

The installed (trusted) code first copies the bundle into a new root-owned directory
PREFIX/.upgrade.XXXX (0700; symlinks and special files refused, never followed), then verifies
that copy: the signature against PREFIX/etc/trusted-key.pem (or a key-rotation statement signed
by it), every file's size and SHA-256, the product, the CPU architecture and the sequence
(rollback protection; `--allow-downgrade` is audited), and for a differential bundle that the
installed release is its base and still holds every held file byte for byte (ADR 0018). Only
then does it run the copy's own, now
verified, install.sh (from the copy, with an empty environment; the stick is never read again),
which checks again with openssl and sha256sum, stages, installs into PREFIX/releases/VERSION,
smoke-tests and switches PREFIX/current atomically. A failure at any step leaves the current
release serving. One upgrade or rollback at a time (PREFIX/.upgrade-lock); a copy left by a killed
upgrade is removed by the next one. See ADR 0010.

Trust state lives in root-owned files under PREFIX, not in the catalog: etc/trusted-key.pem,
etc/sequence (a high-water mark that never goes down) and etc/product.
"""

from __future__ import annotations

import contextlib
import os
import platform
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import click

from appliance.errors import AirlockError
from bundler.errors import BundleError
from bundler.manifest import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    SIGNER_KEY_NAME,
    Manifest,
    fingerprint,
    load_public_key,
    verify_bundle,
    verify_manifest,
)
from bundler.verify import check_held_files

DEFAULT_PREFIX = Path("/opt/airlock")
# install.sh runs with this environment only: nothing from the caller's shell reaches it.
_INSTALL_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


def install_prefix() -> Path:
    """AIRLOCK_PREFIX (set by PREFIX/bin/airlock), else the prefix this venv lives in, else /opt/airlock."""
    configured = os.environ.get("AIRLOCK_PREFIX")
    if configured:
        return Path(configured)
    venv = Path(sys.prefix)
    if venv.name == "venv" and venv.parent.parent.name == "releases":
        return venv.parent.parent.parent
    return DEFAULT_PREFIX


def _read_state(prefix: Path) -> tuple[str, int, str]:
    """(trusted fingerprint, installed sequence, product) of the install at `prefix`."""
    etc = prefix / "etc"
    try:
        key_pem = (etc / "trusted-key.pem").read_bytes()
        sequence = int((etc / "sequence").read_text().strip())
        product = (etc / "product").read_text().strip()
    except (OSError, ValueError) as exc:
        raise AirlockError(f"{etc}: no readable install state (trusted key, sequence, product)",
                           hint="run install.sh from a bundle first, or pass --prefix of the existing install") from exc
    return fingerprint(load_public_key(key_pem, str(etc / "trusted-key.pem"))), sequence, product


def installed_manifest(prefix: Path) -> Manifest | None:
    """The manifest of the release PREFIX/current points at (checked against its own signer key), or None."""
    current = prefix / "current"
    if not current.is_symlink():
        return None
    bundle = current / "bundle"
    try:
        key_pem = (bundle / SIGNER_KEY_NAME).read_bytes()
        return verify_manifest((bundle / MANIFEST_NAME).read_bytes(), (bundle / SIGNATURE_NAME).read_bytes(),
                               key_pem, {fingerprint(load_public_key(key_pem))}, today=date(1970, 1, 1))
    except (OSError, BundleError):
        return None


def check_differential_base(manifest: Manifest, prefix: Path, home: Path) -> None:
    """A differential bundle installs only over its base, which must still hold every held file."""
    if manifest.differential is None:
        return
    base = manifest.differential
    full = f"install the full bundle of {manifest.product} {manifest.version} instead"
    installed = installed_manifest(prefix)
    if installed is None:
        raise BundleError(f"{MANIFEST_NAME}: this differential bundle ships only what changed since {manifest.product} "
                          f"{base.base_version}, and no readable release is installed under {prefix}", hint=full)
    if installed.bundle_id != base.base_bundle_id:
        raise BundleError(f"{MANIFEST_NAME}: this differential bundle needs {manifest.product} {base.base_version} "
                          f"(bundle {base.base_bundle_id[:16]}) installed, but {prefix} runs {installed.version} "
                          f"(bundle {installed.bundle_id[:16]})", hint=full)
    check_held_files(manifest, [prefix / "store", home / "models" / "store"], base=installed.version)


def verify_for_upgrade(bundle: Path, prefix: Path, *, allow_downgrade: bool, home: Path | None = None) -> Manifest:
    """Everything the installed code checks before the new bundle's install.sh may run."""
    trusted, installed_sequence, installed_product = _read_state(prefix)
    manifest = verify_bundle(bundle, {trusted})
    if manifest.product != installed_product:
        raise BundleError(f"{MANIFEST_NAME}: bundle is for product '{manifest.product}', this machine runs "
                          f"'{installed_product}'", hint="use the bundle built for this product")
    if manifest.target.arch != platform.machine():
        raise BundleError(f"{MANIFEST_NAME}: bundle targets {manifest.target.arch}, this machine is "
                          f"{platform.machine()}", hint="use the bundle built for this machine's target")
    if manifest.sequence <= installed_sequence and not allow_downgrade:
        raise BundleError(f"{MANIFEST_NAME}: sequence {manifest.sequence} is not newer than the installed "
                          f"{installed_sequence} (rollback protection)",
                          hint="use a newer bundle; to go back to the previous release use `airlock upgrade "
                               "--rollback`; --allow-downgrade installs it anyway (audited)")
    if home is not None:
        check_differential_base(manifest, prefix, home)
    elif manifest.differential is not None:
        raise BundleError(f"{MANIFEST_NAME}: a differential bundle is checked against the installed release's "
                          "content, and no AIRLOCK_HOME was given", hint="run `airlock upgrade` as installed")
    return manifest


def stage_bundle(bundle: Path, prefix: Path) -> Path:
    """Copy `bundle` into a new private directory under `prefix`; the copy is what gets verified and run.

    Only directories and regular files are copied: a symlink or special file is refused (and a
    file swapped for a FIFO or link while we copy is caught by O_NOFOLLOW and fstat), so nothing
    outside the bundle is read and nothing blocks.
    """
    stage = Path(tempfile.mkdtemp(prefix=".upgrade.", dir=prefix))  # 0700, ours
    try:
        for root, dirs, files in os.walk(bundle):
            rel = Path(root).relative_to(bundle)
            for name in sorted(dirs):
                if (Path(root) / name).is_symlink():
                    raise BundleError(f"{rel / name}: is a symlink; bundles hold regular files only",
                                      hint="copy the bundle again from the source")
                (stage / rel / name).mkdir(mode=0o700)
            for name in files:
                _copy_regular(Path(root) / name, stage / rel / name, rel / name)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return stage


UPGRADE_LOCK = ".upgrade-lock"
"""PREFIX/.upgrade-lock: held (flock) by a running `airlock upgrade` from before its copy until the copy is gone."""


@contextlib.contextmanager
def upgrade_lock(prefix: Path) -> Iterator[None]:
    """Hold PREFIX's upgrade lock, then remove the verified copies that killed upgrades left behind.

    The kernel drops a flock when its holder dies, even by SIGKILL, so a `.upgrade.*` copy found while
    holding the lock belongs to no running upgrade: a bundle's size of disk given back (each copy is the
    whole bundle). A second upgrade while one runs is refused at once rather than left to wait."""
    import fcntl

    try:
        fd = os.open(prefix / UPGRADE_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        raise AirlockError(f"{prefix}: no such install prefix",
                           hint="give the prefix Airlock is installed in (--prefix), e.g. /opt/airlock") from None
    except PermissionError:
        raise AirlockError(f"{prefix / UPGRADE_LOCK}: permission denied",
                           hint="run it as the account that installed Airlock (root for /opt/airlock)") from None
    except OSError as exc:
        raise AirlockError(f"{prefix / UPGRADE_LOCK}: cannot open the upgrade lock ({exc.strerror})",
                           hint="it must be a regular file in the install prefix: remove what is there") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AirlockError(f"{prefix}: another `airlock upgrade` is running", hint="wait for it to end, then "
                               "run this one again if it is still needed") from None
        for stale in sorted(prefix.glob(".upgrade.*")):
            if stale.is_symlink() or not stale.is_dir():
                stale.unlink()  # never followed
            else:
                shutil.rmtree(stale)
            click.echo(f"removed {stale}, the copy of an interrupted upgrade")
        yield
    finally:
        os.close(fd)


def _copy_regular(source: Path, dest: Path, shown: Path) -> None:
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise BundleError(f"{shown}: cannot be read as a regular file ({exc.strerror})",
                          hint="bundles hold regular files only; copy the bundle again from the source") from None
    with os.fdopen(fd, "rb") as src:
        if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
            raise BundleError(f"{shown}: is a special file; bundles hold regular files only",
                              hint="copy the bundle again from the source")
        # 0644 like the stick's files: the directory (0700) keeps others out; install.sh copies them on.
        with open(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)


def _require_admin() -> None:
    """Upgrades and rollbacks are an admin's: once a vault (and so accounts) exists, log in first.

    Sessions live in the key agents of the service account that owns AIRLOCK_HOME (ADR 0010); root
    (which an upgrade needs) asks through a copy of this check run as that account.
    """
    from appliance.access import require
    from appliance.catalog import open_catalog
    from appliance.paths import airlock_home

    home = airlock_home()
    owner = home.stat().st_uid if home.exists() else os.geteuid()
    if os.geteuid() == 0 and owner != 0:
        account = pwd.getpwuid(owner)
        check = subprocess.run(
            ["setpriv", f"--reuid={owner}", f"--regid={account.pw_gid}", "--init-groups", "--no-new-privs", "--",
             sys.executable, "-I", "-m", "appliance.cli", "upgrade", "--check-admin"],
            env={**_INSTALL_ENV, "HOME": str(home), "AIRLOCK_HOME": str(home)}, cwd=home, check=False)
        if check.returncode != 0:
            raise SystemExit(check.returncode)  # the check printed its own error line
        return
    db = open_catalog()
    try:
        require(db, airlock_home(), "release.upgrade", unless_no_vault=True)
    finally:
        db.close()


def _audit(action: str, obj: str, details: dict) -> None:
    from appliance.audit import append_audit
    from appliance.catalog import open_catalog, transaction

    db = open_catalog()
    try:
        with transaction(db):
            append_audit(db, action, obj, details)
    finally:
        db.close()


def record_install(release: Path, action: str, prefix: Path) -> None:
    """Called by install.sh (from the new release, after its smoke test): the audit row for this install."""
    bundle = release / "bundle"
    key_pem = (bundle / SIGNER_KEY_NAME).read_bytes()
    signer = fingerprint(load_public_key(key_pem))
    manifest = verify_manifest((bundle / MANIFEST_NAME).read_bytes(), (bundle / SIGNATURE_NAME).read_bytes(),
                               key_pem, {signer})
    details: dict = {"version": manifest.version, "sequence": manifest.sequence, "bundle_id": manifest.bundle_id,
                     "signer": signer, "prefix": str(prefix)}
    current = prefix / "current"
    if current.is_symlink():
        details["previous"] = os.readlink(current)
    try:
        previous_trusted, previous_sequence, _ = _read_state(prefix)
        details["previous_sequence"] = previous_sequence
        if previous_trusted != signer:
            details["key_rotated_from"] = previous_trusted
    except AirlockError:
        pass  # first install: no earlier state
    _audit(action, f"release:{manifest.version}", details)


def rollback(prefix: Path) -> tuple[str, str]:
    """Swap PREFIX/current and PREFIX/previous atomically; returns (from, to)."""
    current, previous = prefix / "current", prefix / "previous"
    if not previous.is_symlink():
        raise AirlockError(f"{previous}: no previous release to roll back to",
                           hint="a rollback needs an earlier release installed from a bundle")
    old, new = os.readlink(current), os.readlink(previous)
    target = prefix / new
    if (target / ".incomplete").exists() or not (target / "venv" / "bin" / "airlock").is_file():
        raise AirlockError(f"{target}: the previous release is incomplete or damaged",
                           hint="reinstall it from its bundle with install.sh --allow-downgrade")
    for name, value in ((".current.new", new), (".previous.new", old)):
        tmp = prefix / name
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(value)
    os.replace(prefix / ".current.new", current)
    os.replace(prefix / ".previous.new", previous)
    return old, new


@click.command("upgrade")
@click.argument("bundle", required=False, type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--rollback", "do_rollback", is_flag=True, help="Switch back to the previous release.")
@click.option("--allow-downgrade", is_flag=True, help="Install a bundle whose sequence is not newer (audited).")
@click.option("--prefix", type=click.Path(path_type=Path), default=None,
              help="Install prefix (default: AIRLOCK_PREFIX or the running release's).")
@click.option("--python", "python_exe", default=None, help="Python interpreter for the new release's venv.")
@click.option("--record", type=click.Path(path_type=Path), hidden=True)
@click.option("--check-admin", is_flag=True, hidden=True)
@click.option("--action", type=click.Choice(["release.install", "release.upgrade", "release.downgrade"]),
              default="release.install", hidden=True)
def upgrade(bundle: Path | None, do_rollback: bool, allow_downgrade: bool, prefix: Path | None,
            python_exe: str | None, record: Path | None, check_admin: bool, action: str) -> None:
    """Verify and install a newer bundle, or roll back to the previous release."""
    from appliance.paths import airlock_home

    prefix = (prefix or install_prefix()).absolute()
    if record is not None:
        record_install(record, action, prefix)
        return
    if check_admin:
        _require_admin()
        return
    if do_rollback == (bundle is not None):
        raise AirlockError("give a bundle directory or --rollback (one of them)",
                           hint="airlock upgrade /media/usb/BUNDLE   or   airlock upgrade --rollback")
    _require_admin()
    if do_rollback:
        with upgrade_lock(prefix):  # not while an upgrade is switching releases
            old, new = rollback(prefix)
        _audit("release.rollback", f"release:{Path(new).name}", {"from": old, "to": new, "prefix": str(prefix)})
        click.echo(f"rolled back: {prefix / 'current'} -> {new} (was {old})")
        return
    assert bundle is not None
    _read_state(prefix)  # a clear error before copying gigabytes when this is no install
    with upgrade_lock(prefix):
        stage = stage_bundle(bundle.absolute(), prefix)
        try:
            _verify_and_run(stage, prefix, airlock_home(), allow_downgrade=allow_downgrade, python_exe=python_exe)
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def _verify_and_run(stage: Path, prefix: Path, home: Path, *, allow_downgrade: bool, python_exe: str | None) -> None:
    manifest = verify_for_upgrade(stage, prefix, allow_downgrade=allow_downgrade, home=home)
    click.echo(f"verified with the installed key: {manifest.product} {manifest.version} (sequence "
               f"{manifest.sequence}); running its install.sh from the verified copy {stage}")
    command = ["/bin/sh", str(stage / "install.sh"), "--trust", manifest.signer, "--prefix", str(prefix),
               "--home", str(home)]
    units_dir = prefix / "etc" / "units-dir"
    if units_dir.is_file():
        command += ["--units-dir", units_dir.read_text().strip()]
    if allow_downgrade:
        command.append("--allow-downgrade")
    if python_exe:
        command += ["--python", python_exe]
    result = subprocess.run(command, check=False, cwd=stage, env=_INSTALL_ENV)
    if result.returncode != 0:
        raise AirlockError(f"install.sh of {manifest.version} failed (exit {result.returncode}); the current "
                           "release is unchanged", hint="read its REFUSED line above")
