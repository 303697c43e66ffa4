"""Where the appliance keeps its state and finds its base models.

`AIRLOCK_HOME` wins when set. Otherwise a source checkout (the package sits next to a
`pyproject.toml`) uses `<checkout>/.airlock`, and an installed appliance uses
`/var/lib/airlock`, the directory `install.sh` creates.
"""

from __future__ import annotations

import os
from pathlib import Path

INSTALLED_HOME = Path("/var/lib/airlock")
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def source_checkout() -> Path | None:
    """The checkout this code runs from, or None for an installed appliance."""
    if (_PACKAGE_ROOT / "pyproject.toml").is_file() and (_PACKAGE_ROOT / "appliance").is_dir():
        return _PACKAGE_ROOT
    return None


def airlock_home() -> Path:
    """The state directory (catalog, encrypted stores). Not created here."""
    configured = os.environ.get("AIRLOCK_HOME")
    if configured:
        return Path(configured).expanduser().resolve()
    checkout = source_checkout()
    return checkout / ".airlock" if checkout else INSTALLED_HOME


def ensure_home() -> Path:
    """Create the state directory owner-only (0700) if missing and return it."""
    home = airlock_home()
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    return home


def models_dirs() -> list[Path]:
    """Directories searched for base models by name, in order.

    `AIRLOCK_MODELS` (colon-separated) first, then `<home>/models` (where install.sh stages the
    bundle's models), then the checkout's `models/` (the tiny demo models).
    """
    dirs = [Path(p).expanduser() for p in os.environ.get("AIRLOCK_MODELS", "").split(os.pathsep) if p]
    dirs.append(airlock_home() / "models")
    checkout = source_checkout()
    if checkout:
        dirs.append(checkout / "models")
    return dirs
