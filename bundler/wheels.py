"""Collect the target's wheels with pip, build the project's own wheel, write the hash lock.

`pip download --only-binary=:all:` with the target's platform tags, Python version and ABI: the
build station's own platform never leaks in. Anything that is not a wheel is refused, because a
target has no network and no compiler; NVIDIA's public `tensorrt-cu*` packages are stub sdists
that download the real wheels at install time, so they get a hint saying where the wheels are.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bundler.errors import BundleError
from bundler.spec import BundleSpec

LOCK_NAME = "requirements.lock"
# Fixed wheel timestamps make the project's wheel byte-identical from one build to the next.
SOURCE_DATE_EPOCH = "315532800"
_WHEEL = re.compile(r"(?P<name>[A-Za-z0-9_.]+)-(?P<version>[A-Za-z0-9_.+!]+)(-\d[^-]*)?"
                    r"-[^-]+-[^-]+-(?P<plat>[^-]+)\.whl")
_NVIDIA_HINT = ("NVIDIA publishes these wheels on https://pypi.nvidia.com, not the public index (whose tensorrt-cu* "
                "packages are stub sdists that download at install time): fetch the wheel for the target with "
                "`pip download --index-url https://pypi.nvidia.com --only-binary=:all: --no-deps --platform "
                "{platform} --python-version {python} {name}` into a directory and list it in wheels.find_links")


@dataclass(frozen=True)
class Wheel:
    filename: str
    name: str
    version: str
    sha256: str
    size: int
    license: str = ""
    """What the wheel's METADATA says its license is (for the SBOM); empty when it says nothing."""


def parse_wheel_name(filename: str) -> tuple[str, str, str]:
    """(normalized name, version, platform tag) of a wheel filename."""
    match = _WHEEL.fullmatch(filename)
    if not match:
        raise BundleError(f"wheels/{filename}: not a wheel filename", hint="only .whl files can ship in a bundle")
    name = re.sub(r"[-_.]+", "-", match["name"]).lower()
    return name, match["version"], match["plat"]


def _sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(4 * 2**20):
            hasher.update(chunk)
    return hasher.hexdigest()


def _pip_env() -> dict[str, str]:
    return {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1",
            "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH, "PYTHONHASHSEED": "0"}


BUILD_STATE = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".cache", ".pytest_cache",
               ".ruff_cache", ".import_linter_cache", ".airlock", "wheels")
"""Left out of the copy the project wheel is built from: build and tool state, never sources."""


def build_project_wheel(project: Path, out_dir: Path) -> Path:
    """Build the appliance's wheel (no build isolation: the station's venv has setuptools, no network needed)."""
    if not (project / "pyproject.toml").is_file():
        raise BundleError(f"{project}: no pyproject.toml", hint="project.path must point at the airlock source tree")
    # From a copy without build state: setuptools reuses build/lib/, so a module deleted from the
    # tree would otherwise still ship in the wheel.
    with tempfile.TemporaryDirectory(prefix="airlock-src-") as scratch:
        source = Path(scratch) / project.name
        shutil.copytree(project, source, symlinks=True, ignore=shutil.ignore_patterns(*BUILD_STATE))
        result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                                 "--wheel-dir", str(out_dir), str(source)],
                                capture_output=True, text=True, env=_pip_env(), check=False)
    wheels = sorted(out_dir.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise BundleError(f"{project}: building the project wheel failed: {tail}",
                          hint="run `pip wheel --no-deps .` in the project to see the whole error")
    return wheels[0]


def optional_present(spec: BundleSpec) -> tuple[list[str], list[str]]:
    """(optional requirements a find_links directory holds a wheel of, the others)."""
    held = set()
    for directory in spec.find_links:
        for path in directory.glob("*.whl") if directory.is_dir() else ():
            try:
                name, version, _ = parse_wheel_name(path.name)
            except BundleError:
                continue
            held.add((name, version))
    present, missing = [], []
    for requirement in spec.optional_requirements:
        name, version = requirement.split("==")
        normalized = re.sub(r"[-_.]+", "-", name).lower()
        (present if (normalized, version) in held else missing).append(requirement)
    return present, missing


def download_wheels(spec: BundleSpec, dest: Path) -> list[Wheel]:
    """Fill `dest` with every wheel the target needs and return them sorted by filename."""
    dest.mkdir(parents=True, exist_ok=True)
    requirements = list(spec.requirements) + optional_present(spec)[0]
    with tempfile.TemporaryDirectory(prefix="airlock-project-") as project_dir:
        if spec.project is not None:
            wheel = build_project_wheel(spec.project.path, Path(project_dir))
            extras = f"[{','.join(spec.project.extras)}]" if spec.project.extras else ""
            requirements.append(f"{wheel}{extras}")
        if not requirements:
            return []
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest", str(dest),
                   "--python-version", spec.target.python, "--implementation", "cp",
                   "--abi", f"cp{spec.target.python.replace('.', '')}"]
        for tag in spec.target.platform_tags():
            command += ["--platform", tag]
        if not spec.use_index:
            command.append("--no-index")
        for directory in spec.find_links:
            if not directory.is_dir() and spec.optional_requirements:
                continue  # a directory only for optional wheels may be absent: they are skipped
            if not directory.is_dir():
                raise BundleError(f"{directory}: wheels.find_links directory does not exist",
                                  hint="create it and put the wheels there, or remove it from the spec")
            command += ["--find-links", str(directory)]
        result = subprocess.run([*command, *requirements], capture_output=True, text=True, env=_pip_env(),
                                check=False)
    if result.returncode != 0:
        raise _explain_pip_failure(result.stderr, spec)
    wheels = []
    for path in sorted(dest.iterdir()):
        if not path.name.endswith(".whl"):
            raise BundleError(f"wheels/{path.name}: is a source distribution, not a wheel",
                              hint="the target cannot build or download anything: ship a wheel for the target "
                                   "platform instead")
        name, version, _ = parse_wheel_name(path.name)
        wheels.append(Wheel(path.name, name, version, _sha256(path), path.stat().st_size, wheel_license(path)))
    return wheels


def wheel_license(path: Path) -> str:
    """The license a wheel declares: License-Expression, else a one-line License field, else its
    "License ::" classifiers; empty when it declares none or the metadata cannot be read."""
    import zipfile
    from email.parser import HeaderParser

    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist()
                         if n.count("/") == 1 and n.endswith(".dist-info/METADATA")), None)
            if name is None:
                return ""
            text = archive.read(name)[:1_000_000].decode("utf-8", "replace")
    except (OSError, zipfile.BadZipFile):
        return ""
    meta = HeaderParser().parsestr(text, headersonly=True)
    expression = (meta.get("License-Expression") or "").strip()
    if expression:
        return expression[:200]
    declared = (meta.get("License") or "").strip()
    if declared and "\n" not in declared and len(declared) <= 100:
        return declared
    classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or []
                   if c.startswith("License ::") and c.count("::") >= 2]
    return ", ".join(dict.fromkeys(classifiers))[:200]


def _explain_pip_failure(stderr: str, spec: BundleSpec) -> BundleError:
    missing = re.search(r"No matching distribution found for ([A-Za-z0-9._-]+)", stderr)
    if missing:
        name = missing.group(1)
        if re.match(r"(tensorrt|nvidia)", name, re.I):
            hint = _NVIDIA_HINT.format(platform=spec.target.platform, python=spec.target.python, name=name)
        else:
            hint = (f"no wheel of {name} for {spec.target.platform} / cp{spec.target.python.replace('.', '')}: "
                    "only wheels can ship (sdists and stubs are refused); put the wheel in a find_links directory")
        return BundleError(f"wheels: {name} has no wheel for the target (only an sdist or nothing)", hint=hint)
    lines = [line for line in stderr.strip().splitlines() if line.startswith("ERROR")] or stderr.strip().splitlines()
    return BundleError(f"wheels: pip download failed: {(lines or ['no output'])[-1]}",
                       hint="rerun the spec's requirements with `pip download --only-binary=:all:` to see why")


def write_lock(wheels: list[Wheel], path: Path) -> None:
    """`name==version --hash=sha256:...` per wheel: install.sh installs with --require-hashes --no-deps."""
    lines = [f"{w.name}=={w.version} --hash=sha256:{w.sha256}" for w in sorted(wheels, key=lambda w: w.name)]
    path.write_text("".join(line + "\n" for line in lines), encoding="ascii")


_LEGACY_GLIBC = {"manylinux1": 5, "manylinux2010": 12, "manylinux2014": 17}


def glibc_of_platform(plat: str) -> int:
    """glibc minor a manylinux platform tag needs; 0 for pure/other tags."""
    match = re.match(r"manylinux_2_(\d+)_", plat)
    if match:
        return int(match.group(1))
    return next((v for k, v in _LEGACY_GLIBC.items() if plat.startswith(k + "_")), 0)


def highest_glibc(wheels: list[Wheel]) -> int:
    """The newest glibc minor any shipped wheel needs.

    A wheel tagged for several platforms (`manylinux_2_17_x86_64.manylinux2014_x86_64`) runs where
    the least demanding of its tags does, so each wheel counts with its minimum.
    """
    highest = 0
    for wheel in wheels:
        needs = [g for g in (glibc_of_platform(p) for p in parse_wheel_name(wheel.filename)[2].split(".")) if g]
        if needs:
            highest = max(highest, min(needs))
    return highest
