"""Offline by construction: switch every Hugging Face and telemetry knob off before any import.

`appliance/__init__.py` calls `enforce_offline()` so that the environment is set before
transformers, huggingface_hub or datasets can be imported by anything under `appliance`.
Jobs are child processes and inherit the environment.

`forbid_network()` is the second line: an audit hook (PEP 578) that refuses any socket connect
to a non-loopback address in this process. The inference server binds and accepts; it never
connects out, so the hook stays on for it too.
"""

from __future__ import annotations

import ipaddress
import os
import sys

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    "DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "WANDB_MODE": "disabled",
    "WANDB_DISABLED": "true",
    "MLFLOW_TRACKING_URI": "",
    "TOKENIZERS_PARALLELISM": "false",
}

_hook_installed = False


class NetworkForbiddenError(RuntimeError):
    """Raised by the audit hook when code tries to connect outside loopback."""


def enforce_offline() -> None:
    """Set the offline environment. Values are forced, not defaulted: a stray export of
    HF_HUB_OFFLINE=0 in a site's shell profile must not turn downloads back on."""
    os.environ.update(OFFLINE_ENV)


def _is_local(address: object) -> bool:
    if isinstance(address, str):  # AF_UNIX path
        return True
    if isinstance(address, tuple) and address:
        host = str(address[0])
        if host in ("localhost", ""):
            return True
        try:
            return ipaddress.ip_address(host.split("%")[0]).is_loopback
        except ValueError:
            return False  # a hostname other than localhost would need DNS: not local
    return False


def _audit(event: str, args: tuple) -> None:
    if event == "socket.connect" and not _is_local(args[1]):
        raise NetworkForbiddenError(f"network access refused: connect to {args[1]!r}")
    if event == "socket.getaddrinfo" and args and not _is_literal_or_localhost(args[0]):
        raise NetworkForbiddenError(f"network access refused: name lookup of {args[0]!r}")


def _is_literal_or_localhost(host: object) -> bool:
    """True when resolving `host` needs no DNS (binding 0.0.0.0 or ::1 must keep working)."""
    if host is None:
        return True
    name = host.decode() if isinstance(host, bytes) else str(host)
    if name in ("localhost", ""):
        return True
    try:
        ipaddress.ip_address(name.split("%")[0])
    except ValueError:
        return False
    return True


def forbid_network() -> None:
    """Install the audit hook (once; audit hooks cannot be removed)."""
    global _hook_installed
    if not _hook_installed:
        sys.addaudithook(_audit)
        _hook_installed = True
