"""`airlock --help` stays fast: the serve and keys commands load no web framework and no ML stack."""

from __future__ import annotations

from tests.test_import_hygiene import HEAVY, _loaded_after


def test_serve_commands_import_no_heavy_modules():
    loaded = _loaded_after("import appliance.serve.cli, appliance.serve.keys_cli, appliance.serve.api_keys")
    assert loaded.isdisjoint([*HEAVY, "fastapi", "uvicorn", "starlette", "pydicom", "numpy"])
