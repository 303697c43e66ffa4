"""Collect the target's wheels with pip, build the project's own wheel, write the hash lock.

pip resolves (`install --dry-run --report`, `--only-binary=:all:`) with the target's platform
tags, Python version and ABI: the build station's own platform never leaks in. Local wheels are
not copied by pip: the builder copies and hashes them in one pass; only index wheels are
downloaded (`pip download --no-deps` of the exact URLs pip chose). Anything that is not a wheel is refused, because a
target has no network and no compiler; NVIDIA's public `tensorrt-cu*` packages are stub sdists
that download the real wheels at install time, so they get a hint saying where the wheels are.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

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


@dataclass(frozen=True)
class ResolvedWheel:
    """A wheel pip chose for the target, not yet placed in the bundle."""

    filename: str
    name: str
    version: str
    source: Path
    """Where its bytes are: a find_links file or the project's build directory (copied into the
    bundle), or the bundle's wheels/ directory itself when pip had to download it."""
    downloaded: bool
    license: str

    def placed(self, sha256: str, size: int) -> Wheel:
        return Wheel(self.filename, self.name, self.version, sha256, size, self.license)


@contextmanager
def collect_wheels(spec: BundleSpec, dest: Path) -> Iterator[list[ResolvedWheel]]:
    """Resolve every wheel the target needs (sorted by filename), without copying a local one.

    pip resolves with `install --dry-run --report` for the target's tags (it reads only metadata);
    wheels it found on a local path (find_links, the project's wheel) are left where they are for
    the caller to copy and hash in one pass; only wheels from an index are downloaded, into `dest`.
    Valid inside the `with` block (the project's wheel lives in a temporary directory).
    """
    dest.mkdir(parents=True, exist_ok=True)
    requirements = list(spec.requirements) + optional_present(spec)[0]
    with tempfile.TemporaryDirectory(prefix="airlock-project-") as scratch:
        if spec.project is not None:
            wheel = build_project_wheel(spec.project.path, Path(scratch) / "project")
            extras = f"[{','.join(spec.project.extras)}]" if spec.project.extras else ""
            requirements.append(f"{wheel}{extras}")
        if not requirements:
            yield []
            return
        report_path = Path(scratch) / "report.json"
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
                                 "--report", str(report_path), "--target", str(Path(scratch) / "target"),
                                 *_target_options(spec), *requirements],
                                capture_output=True, text=True, env=_pip_env(), check=False)
        if result.returncode != 0:
            raise _explain_pip_failure(result.stderr, spec)
        resolved, remote = [], []
        for item in json.loads(report_path.read_text(encoding="utf-8"))["install"]:
            url = item["download_info"]["url"]
            filename = unquote(urlparse(url).path.rsplit("/", 1)[-1])
            if not filename.endswith(".whl"):
                raise BundleError(f"wheels/{filename}: is a source distribution, not a wheel",
                                  hint="the target cannot build or download anything: ship a wheel for the target "
                                       "platform instead")
            name, version, _ = parse_wheel_name(filename)
            local = urlparse(url).scheme == "file"
            source = Path(url2pathname(unquote(urlparse(url).path))) if local else dest / filename
            if not local:
                remote.append(url)
            resolved.append(ResolvedWheel(filename, name, version, source, not local,
                                          license_from_metadata(item.get("metadata", {}))))
        if remote:
            fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest",
                                      str(dest), *_target_options(spec), *remote],
                                     capture_output=True, text=True, env=_pip_env(), check=False)
            if fetched.returncode != 0:
                raise _explain_pip_failure(fetched.stderr, spec)
        names = [w.filename for w in resolved]
        if len(set(names)) != len(names):
            raise BundleError(f"wheels: pip chose two wheels of the same file name ({names})",
                              hint="pin one version of each package")
        yield sorted(resolved, key=lambda w: w.filename)


def _target_options(spec: BundleSpec) -> list[str]:
    """pip's options that pick wheels for the target (never this station), from the spec's sources."""
    options = ["--only-binary=:all:", "--python-version", spec.target.python, "--implementation", "cp",
               "--abi", f"cp{spec.target.python.replace('.', '')}"]
    for tag in spec.target.platform_tags():
        options += ["--platform", tag]
    if not spec.use_index:
        options.append("--no-index")
    for directory in spec.find_links:
        if not directory.is_dir() and spec.optional_requirements:
            continue  # a directory only for optional wheels may be absent: they are skipped
        if not directory.is_dir():
            raise BundleError(f"{directory}: wheels.find_links directory does not exist",
                              hint="create it and put the wheels there, or remove it from the spec")
        options += ["--find-links", str(directory)]
    return options


def license_from_metadata(metadata: dict) -> str:
    """The license of pip's JSON metadata (PEP 566 form), by the rules of `wheel_license`."""
    return _pick_license(str(metadata.get("license_expression") or ""), str(metadata.get("license") or ""),
                         [str(c) for c in metadata.get("classifier") or []])


def _pick_license(expression: str, declared: str, classifiers: list[str]) -> str:
    expression, declared = expression.strip(), declared.strip()
    if expression:
        return expression[:200]
    if declared and "\n" not in declared and len(declared) <= 100:
        return declared
    names = [c.split("::")[-1].strip() for c in classifiers if c.startswith("License ::") and c.count("::") >= 2]
    return ", ".join(dict.fromkeys(names))[:200]


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
    return _pick_license(meta.get("License-Expression") or "", meta.get("License") or "",
                         list(meta.get_all("Classifier") or []))


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
