"""`airlock doctor`: is this machine ready to run the appliance? One row per check.

A check is `ok`, `warn` (works, but the operator should know: no GPU, no TensorRT, a default
route) or `fail` (something is broken: the CLI exits non-zero). Doctor never writes: a missing
catalog is reported, not created.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from appliance.offline import OFFLINE_ENV
from appliance.paths import airlock_home

MIN_FREE_GIB_FAIL = 1
MIN_FREE_GIB_WARN = 20


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # "ok" | "warn" | "fail"
    detail: str
    hint: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def check_python() -> Check:
    # Older Pythons cannot import this package at all, so reaching here means >= 3.11.
    return Check("python", "ok", f"{platform.python_version()} ({sys.executable})")


def check_airlock() -> Check:
    from appliance import __version__

    return Check("airlock", "ok", __version__)


def _nvidia_smi() -> list[str]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        result = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in result.stdout.splitlines() if line.strip()] if result.returncode == 0 else []


def check_torch() -> list[Check]:
    if importlib.util.find_spec("torch") is None:
        return [Check("torch", "fail", "not installed", "install the appliance from its bundle (install.sh)")]
    import torch

    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
    checks = [Check("torch", "ok", f"{torch.__version__} ({build})")]
    gpus = _nvidia_smi()
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        detail = f"{len(names)} GPU(s): {', '.join(names)}; CUDA {torch.version.cuda}"
        if gpus:
            detail += f"; driver {gpus[0].split(',')[-1].strip()}"
        checks.append(Check("gpu", "ok", detail))
    elif gpus:
        checks.append(Check("gpu", "warn", f"nvidia-smi sees {len(gpus)} GPU(s) but torch cannot use them "
                                           f"(torch CUDA build: {torch.version.cuda or 'none'})",
                            "install the bundle built for this machine's CUDA major version"))
    elif torch.version.cuda:
        checks.append(Check("gpu", "warn", f"the CUDA {torch.version.cuda} stack is installed, but there is no "
                                           "NVIDIA driver or GPU: training and serving run on the CPU (slow)",
                            "install the NVIDIA driver (install.sh's preflight names the version) and reboot"))
    else:
        checks.append(Check("gpu", "warn", "no NVIDIA GPU: training and serving run on the CPU (slow)",
                            "fine for the demo; production sites need an NVIDIA GPU"))
    return checks


def check_tensorrt() -> Check:
    if importlib.util.find_spec("tensorrt") is None:
        return Check("tensorrt", "warn", "absent: models are served through ONNX Runtime",
                     "ship TensorRT wheels in the bundle for GPU targets")
    try:
        version = importlib.metadata.version("tensorrt")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown version"
    return Check("tensorrt", "ok", version)


def check_onnxruntime() -> Check:
    if importlib.util.find_spec("onnxruntime") is None:
        return Check("onnxruntime", "fail", "not installed", "install the appliance from its bundle (install.sh)")
    import onnxruntime

    providers = onnxruntime.get_available_providers()
    return Check("onnxruntime", "ok", f"{onnxruntime.__version__}; providers: {', '.join(providers)}")


def check_disk(home: Path) -> Check:
    probe = home
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    free_gib = usage.free / 2**30
    detail = f"{free_gib:.1f} GiB free under {home}"
    if free_gib < MIN_FREE_GIB_FAIL:
        return Check("disk", "fail", detail, "free space on that filesystem or move AIRLOCK_HOME")
    if free_gib < MIN_FREE_GIB_WARN:
        return Check("disk", "warn", detail, f"training needs room: keep at least {MIN_FREE_GIB_WARN} GiB free")
    return Check("disk", "ok", detail)


def check_catalog(home: Path) -> list[Check]:
    from appliance.audit import verify_chain
    from appliance.catalog import CATALOG_FILENAME, SCHEMA_VERSION, open_catalog, schema_version
    from appliance.errors import AirlockError

    path = home / CATALOG_FILENAME
    if not path.exists():
        return [Check("catalog", "ok", f"not created yet ({path}); created on first use")]
    try:
        db = open_catalog(home, migrate=False)
    except AirlockError as exc:
        return [Check("catalog", "fail", exc.message, exc.hint)]
    try:
        version = schema_version(db)
        if version > SCHEMA_VERSION:
            catalog = Check("catalog", "fail", f"schema {version} is newer than this release ({SCHEMA_VERSION})",
                            "run the airlock release that wrote this catalog")
        elif version < SCHEMA_VERSION:
            catalog = Check("catalog", "warn", f"schema {version}; migrates to {SCHEMA_VERSION} on next use")
        else:
            catalog = Check("catalog", "ok", f"schema {version} ({path})")
        if "audit_log" not in db.table_names():
            return [catalog]
        report = verify_chain(db)
    finally:
        db.close()
    if report.ok:
        head = f"{report.head_seq}:{report.head_hash[:16]}"
        audit = Check("audit chain", "ok", f"{report.rows_checked} rows; head {head}")
    else:
        where = f"first broken row: seq {report.first_broken_seq}; " if report.first_broken_seq else ""
        audit = Check("audit chain", "fail", f"{where}{report.reason}",
                      "preserve the catalog as evidence; run `airlock audit verify` and tell your security office")
    return [catalog, audit]


def check_key_slots(home: Path) -> list[Check]:
    """Passphrase slots far below the default KDF cost (the test profile, a tiny --kdf-memory-mib) are
    cheap to guess from a stolen catalog. A warning, not a failure: `install.sh` refuses a release
    whose doctor fails, and an upgrade must never be blocked by the strength of someone's slot."""
    import sqlite3

    from appliance.catalog import CATALOG_FILENAME
    from appliance.vault.keyslots import KdfParams, is_weak

    path = home / CATALOG_FILENAME
    if not path.exists():
        return []
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            rows = conn.execute("SELECT slot_id, kdf FROM vault_key_slots WHERE kind = 'passphrase'").fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return []  # no vault yet (check_catalog reports an unreadable catalog)
    weak = []
    for slot_id, kdf_text in rows:
        try:
            kdf = KdfParams.from_dict(json.loads(kdf_text))
        except (ValueError, TypeError, KeyError):
            weak.append(f"{slot_id} (unreadable parameters)")
            continue
        if is_weak(kdf):
            weak.append(f"{slot_id} ({kdf.name}, {max(kdf.memory_kib, 128 * kdf.r * kdf.n // 1024) // 1024} MiB)")
    if not rows:
        return []
    if not weak:
        return [Check("key slots", "ok", f"{len(rows)} passphrase slot(s) at full KDF cost")]
    return [Check("key slots", "warn",
                  f"weak passphrase slots (cheap to guess from a stolen catalog): {', '.join(weak)}",
                  "each person runs `airlock users passwd` without AIRLOCK_KDF_PROFILE and --kdf-memory-mib, "
                  "or an admin runs `airlock vault rekey`")]


def _has_default_route() -> bool | None:
    """True/False from /proc (IPv4 and IPv6), None where /proc/net is not available."""
    found = False
    try:
        for line in Path("/proc/net/route").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 1 and fields[1] == "00000000":
                found = True
    except OSError:
        return None
    try:
        for line in Path("/proc/net/ipv6_route").read_text().splitlines():
            fields = line.split()
            if fields and fields[0] == "0" * 32 and fields[1] == "00" and fields[-1] != "lo":
                found = True
    except OSError:
        pass
    return found


def check_network() -> list[Check]:
    forced = [k for k, v in OFFLINE_ENV.items() if os.environ.get(k) != v]
    offline = (Check("offline mode", "ok", "HF hub, datasets and telemetry disabled") if not forced else
               Check("offline mode", "fail", f"not set: {', '.join(forced)}",
                     "start airlock through its own entry points, which set these"))
    route = _has_default_route()
    if route is None:
        network = Check("network", "warn", "cannot read /proc/net/route", "check the routing table by hand")
    elif route:
        network = Check("network", "warn", "a default route exists (airlock itself never connects out)",
                        "site policy may require the appliance on an isolated network")
    else:
        network = Check("network", "ok", "no default route: isolated")
    return [offline, network]


def run_checks(home: Path | None = None) -> list[Check]:
    home = home or airlock_home()
    return [check_python(), check_airlock(), *check_torch(), check_tensorrt(), check_onnxruntime(),
            check_disk(home), *check_catalog(home), *check_key_slots(home), *check_network()]


def worst_status(checks: list[Check]) -> str:
    statuses = {c.status for c in checks}
    return "fail" if "fail" in statuses else "warn" if "warn" in statuses else "ok"
