"""The bundle spec: a TOML file people write, read into frozen dataclasses and validated.

Relative paths in the spec are relative to the spec file's directory, so a spec can sit next to
its wheelhouse. The field-by-field documentation is bundler/examples/cpu-demo.toml.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from bundler.errors import BundleError

# Minimum NVIDIA driver for each CUDA major version (CUDA toolkit release notes, "minor version compatibility").
MIN_DRIVER_FOR_CUDA = {12: 525, 13: 580}
_PINNED = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9][A-Za-z0-9.+!-]*")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_PLATFORM = re.compile(r"manylinux_2_(\d{1,3})_(x86_64|aarch64)")


@dataclass(frozen=True)
class TargetSpec:
    python: str
    """Python version on the target, "3.11": picks cp311 wheels and the interpreter install.sh uses."""
    platform: str
    """Highest manylinux tag the target's glibc accepts, e.g. manylinux_2_28_x86_64."""
    cuda_major: int = 0
    """CUDA major version the GPU wheels are built for (12, 13); 0 for a CPU-only bundle."""
    min_driver: int = 0
    """Lowest NVIDIA driver major the target needs; defaults from cuda_major (525 for 12, 580 for 13)."""
    min_compute_capability: str = ""
    """Oldest GPU architecture the GPU wheels (and TensorRT) run on, e.g. "7.5"; "" = not checked."""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"3\.\d{1,2}", self.python):
            raise _spec_error("target.python", f"{self.python!r} is not like \"3.11\"")
        if not _PLATFORM.fullmatch(self.platform):
            raise _spec_error("target.platform", f"{self.platform!r} is not like manylinux_2_28_x86_64")
        if self.min_compute_capability and not (self.cuda_major and re.fullmatch(r"[1-9][0-9]?\.[0-9]",
                                                                                  self.min_compute_capability)):
            raise _spec_error("target.min_compute_capability",
                              f"{self.min_compute_capability!r} is not like \"7.5\" (GPU bundles only)")
        if self.cuda_major and self.cuda_major not in MIN_DRIVER_FOR_CUDA:
            raise _spec_error("target.cuda_major", f"{self.cuda_major} is not one of {sorted(MIN_DRIVER_FOR_CUDA)}")

    @property
    def glibc_minor(self) -> int:
        return int(_PLATFORM.fullmatch(self.platform).group(1))  # type: ignore[union-attr]

    @property
    def arch(self) -> str:
        return _PLATFORM.fullmatch(self.platform).group(2)  # type: ignore[union-attr]

    @property
    def driver_needed(self) -> int:
        return self.min_driver or MIN_DRIVER_FOR_CUDA.get(self.cuda_major, 0)

    def platform_tags(self) -> list[str]:
        """Every manylinux tag the target accepts, newest first: pip does not infer older ones."""
        tags = [f"manylinux_2_{minor}_{self.arch}" for minor in range(self.glibc_minor, 4, -1)]
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
        tags += [f"{name}_{self.arch}" for minor, name in legacy.items()
                 if minor <= self.glibc_minor and (self.arch == "x86_64" or minor == 17)]
        return tags


@dataclass(frozen=True)
class ProjectSpec:
    path: Path
    """Source tree of the appliance (the directory with pyproject.toml); its wheel is built and shipped."""
    extras: tuple[str, ...] = ()
    """Extras whose pinned requirements ship too, e.g. ["appliance"] for the full ML stack."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    """The name operators see and `airlock base-models list` shows."""
    path: Path | None = None
    """A local Hugging Face directory: config, tokenizer files and safetensors shards."""
    hub: str | None = None
    """Instead of path: a hub repo id fetched on the build station (needs huggingface_hub and network)."""
    revision: str | None = None
    """With hub: the exact commit to fetch, so rebuilding gives the same bytes."""

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise _spec_error(f"models.{self.name}", "name must be [A-Za-z0-9._+-], at most 64 characters")
        if (self.path is None) == (self.hub is None):
            raise _spec_error(f"models.{self.name}", "give exactly one of path or hub")
        if self.hub and not (self.revision and re.fullmatch(r"[0-9a-f]{40}", self.revision)):
            raise _spec_error(f"models.{self.name}", "hub models need revision = the 40-hex commit to pin")


@dataclass(frozen=True)
class BundleSpec:
    product: str
    """Product name; install.sh and `airlock upgrade` refuse a bundle for another product."""
    version: str
    """Release version; the release installs into PREFIX/releases/VERSION."""
    sequence: int
    """Strictly increasing across releases; a target refuses a bundle whose sequence is not higher."""
    expires: date
    """After this date targets refuse the bundle (limits how long a leaked old bundle is useful)."""
    target: TargetSpec
    requirements: tuple[str, ...] = ()
    """Pinned wheels (name==version); their dependencies are resolved and must be pinned too."""
    find_links: tuple[Path, ...] = ()
    """Directories of extra wheels (TensorRT and NVIDIA wheels that are not on the public index)."""
    optional_requirements: tuple[str, ...] = ()
    """Pinned wheels that ship when a find_links directory holds them and are skipped otherwise (TensorRT)."""
    use_index: bool = True
    """False: wheels come from find_links only (air-gapped build stations, tests)."""
    project: ProjectSpec | None = None
    models: tuple[ModelSpec, ...] = ()

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.product):
            raise _spec_error("product", "must be [A-Za-z0-9._+-], at most 64 characters")
        if not re.fullmatch(r"[0-9A-Za-z][0-9A-Za-z.+-]{0,63}", self.version):
            raise _spec_error("version", f"{self.version!r} is not a version like 1.2.0")
        if isinstance(self.sequence, bool) or not 1 <= self.sequence <= 2**53:
            raise _spec_error("sequence", "must be a positive integer")
        for field, values in (("requirements", self.requirements), ("optional_requirements",
                                                                     self.optional_requirements)):
            for requirement in values:
                if not _PINNED.fullmatch(requirement):
                    raise _spec_error(f"wheels.{field}", f"{requirement!r} is not pinned as name==version")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise _spec_error("models", "two models have the same name")


def _spec_error(field: str, what: str, path: Path | None = None) -> BundleError:
    where = f"{path}: " if path else ""
    return BundleError(f"{where}spec field {field}: {what}", hint="see bundler/examples/cpu-demo.toml")


def _table(data: dict[str, Any], key: str, allowed: set[str], path: Path) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise _spec_error(key, "must be a table", path)
    unknown = set(value) - allowed
    if unknown:
        raise _spec_error(key, f"unknown keys {sorted(unknown)}", path)
    return value


def load_spec(path: Path) -> BundleSpec:
    """Read and validate a spec file; every error names the file and the field."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BundleError(f"{path}: cannot read the spec ({exc.strerror})", hint="check the path") from exc
    except tomllib.TOMLDecodeError as exc:
        raise BundleError(f"{path}: not valid TOML ({exc})", hint="fix the syntax at the line shown") from exc
    base = path.resolve().parent
    unknown = set(data) - {"product", "version", "sequence", "expires", "target", "wheels", "project", "models"}
    if unknown:
        raise _spec_error("top level", f"unknown keys {sorted(unknown)}", path)
    for key in ("product", "version", "sequence", "expires", "target"):
        if key not in data:
            raise _spec_error(key, "is required", path)
    if not isinstance(data["expires"], date):
        raise _spec_error("expires", "must be a TOML date like 2027-06-30", path)
    try:
        target = TargetSpec(**_table(data, "target", {"python", "platform", "cuda_major", "min_driver",
                                                            "min_compute_capability"}, path))
        wheels = _table(data, "wheels", {"requirements", "optional_requirements", "find_links", "index"}, path)
        project_raw = _table(data, "project", {"path", "extras"}, path) if "project" in data else None
        # Resolved: a spec's "../.." would otherwise name the project ".." (its wheel is built from a copy
        # named after it).
        project = (ProjectSpec((base / project_raw["path"]).resolve(), tuple(project_raw.get("extras", ())))
                   if project_raw else None)
        models_raw = data.get("models", [])
        if not isinstance(models_raw, list):
            raise _spec_error("models", "must be an array of tables ([[models]])", path)
        models = []
        for raw in models_raw:
            unknown_model = set(raw) - {"name", "path", "hub", "revision"}
            if unknown_model:
                raise _spec_error("models", f"unknown keys {sorted(unknown_model)}", path)
            models.append(ModelSpec(name=raw.get("name", ""), path=base / raw["path"] if "path" in raw else None,
                                    hub=raw.get("hub"), revision=raw.get("revision")))
        return BundleSpec(
            product=data["product"], version=str(data["version"]), sequence=data["sequence"],
            expires=data["expires"], target=target, requirements=tuple(wheels.get("requirements", ())),
            optional_requirements=tuple(wheels.get("optional_requirements", ())),
            find_links=tuple(base / p for p in wheels.get("find_links", ())), use_index=bool(wheels.get("index", True)),
            project=project, models=tuple(models),
        )
    except TypeError as exc:
        raise BundleError(f"{path}: {exc}", hint="see bundler/examples/cpu-demo.toml") from exc
    except BundleError as exc:
        if not exc.message.startswith(str(path)):
            raise BundleError(f"{path}: {exc.message}", hint=exc.hint) from exc
        raise
