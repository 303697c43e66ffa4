"""A CycloneDX 1.5 JSON SBOM of every wheel and model in a bundle, for the site's security office.

Each library carries the license its wheel declares (METADATA), as a license name.

Deterministic on purpose (no timestamp; the serial number is derived from the contents), so the
SBOM's hash in the manifest does not change between two builds of the same inputs.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from bundler.wheels import Wheel

_NAMESPACE = uuid.UUID("0b6f6c1e-4f51-4d38-9a57-6b1d7f1f3a10")


@dataclass(frozen=True)
class ModelRecord:
    name: str
    files: tuple[tuple[str, str], ...]  # (path inside the bundle, sha256)


def build_sbom(product: str, version: str, wheels: list[Wheel], models: list[ModelRecord]) -> bytes:
    components = [{
        "type": "library", "bom-ref": f"pkg:pypi/{w.name}@{w.version}", "name": w.name, "version": w.version,
        "purl": f"pkg:pypi/{w.name}@{w.version}", "hashes": [{"alg": "SHA-256", "content": w.sha256}],
        "properties": [{"name": "airlock:file", "value": f"wheels/{w.filename}"}],
        # As the wheel declares it (not a legal review): the site's office sees e.g. a GPL package at once.
        **({"licenses": [{"license": {"name": w.license}}]} if w.license else {}),
    } for w in sorted(wheels, key=lambda w: w.name)]
    for model in sorted(models, key=lambda m: m.name):
        components.append({
            "type": "machine-learning-model", "bom-ref": f"model:{model.name}", "name": model.name,
            "components": [{"type": "data", "name": path, "hashes": [{"alg": "SHA-256", "content": digest}]}
                           for path, digest in model.files],
        })
    body = {"bomFormat": "CycloneDX", "specVersion": "1.5", "version": 1,
            "metadata": {"component": {"type": "application", "name": product, "version": version,
                                       "bom-ref": f"{product}@{version}"}},
            "components": components}
    serial = uuid.uuid5(_NAMESPACE, json.dumps(body, sort_keys=True))
    body["serialNumber"] = f"urn:uuid:{serial}"
    return (json.dumps(body, sort_keys=True, indent=1) + "\n").encode("utf-8")


def summarize_sbom(data: bytes) -> dict[str, int]:
    """Counts for `inspect`: libraries and models."""
    try:
        components = json.loads(data).get("components", [])
    except ValueError:
        return {"libraries": 0, "models": 0}
    return {"libraries": sum(c.get("type") == "library" for c in components),
            "models": sum(c.get("type") == "machine-learning-model" for c in components)}
