"""Registry fixtures: a real vault (init + unlock through the CLI), datasets imported through
`airlock data import`, and the demo corpus split into two domains: maintenance Q&A (A) and
radiology report summaries (B)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.appliance.vault.conftest import agents, fast_kdf, passphrase_file, unlock, vault_init  # noqa: F401
from tests.conftest import REPO, run_cli

# v1: 12 steps of batch 4 x 64 tokens. Retrains scale the steps to their mix (new + replay records).
TINY_RECIPE = """\
max_steps = 12
eval_every = 6
batch_size = 4
max_length = 64
lr = 3e-3
seed = 3
"""


def chats(domain: str) -> list[str]:
    """Chat records of the demo corpus: 'maintenance' Q&A or 'radiology' report summaries (unique lines)."""
    lines = (REPO / "models" / "corpus" / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    found = [line for line in lines if '"messages"' in line
             and (("Summarise this report" in line) == (domain == "radiology"))]
    return list(dict.fromkeys(found))


def write_jsonl(folder: Path, name: str, lines: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def cli_json(*args: str, rc: int = 0) -> dict:
    result = run_cli(*args)
    assert result.returncode == rc, (result.stdout[-2000:], result.stderr[-2000:])
    return json.loads(result.stdout)


def one_line_error(result) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_RECIPE, encoding="utf-8")
    return path
