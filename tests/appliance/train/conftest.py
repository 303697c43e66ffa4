"""Training-job fixtures: a real vault (init + unlock through the CLI, a real key agent) and datasets
imported through `airlock data import`, as an operator would build them. The vault has the fixed site
secret, so a dataset's split, and every loss or AUC learned from it, is the same on every run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.appliance.vault.conftest import agents, fast_kdf, passphrase_file, unlock, vault_init  # noqa: F401
from tests.conftest import REPO, fix_site_secret, run_cli

TINY_LM_RECIPE = """\
# 24 steps of batch 4 x 128 tokens: a few seconds on two CPU cores
max_steps = 24
eval_every = 4
batch_size = 4
max_length = 128
lr = 3e-3
seed = 3
"""


def corpus_chats(count: int) -> list[str]:
    lines = (REPO / "models" / "corpus" / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    return [line for line in lines if '"messages"' in line][:count]


@pytest.fixture
def unlocked(vault_init, unlock):  # noqa: F811 - the fixtures imported above
    """An initialized, unlocked vault with the fixed site secret (imports into it split the same on every run)."""
    vault_init()
    unlock()
    fix_site_secret()


@pytest.fixture
def qa_dataset(unlocked, tmp_path: Path) -> str:
    """Dataset `qa`: 120 chat Q&A records from the demo corpus (train/val/test 80/10/10 by content hash)."""
    source = tmp_path / "qa-source"
    source.mkdir()
    (source / "qa.jsonl").write_text("\n".join(corpus_chats(120)) + "\n", encoding="utf-8")
    result = run_cli("data", "import", str(source), "--name", "qa", "--near-dup", "off")
    assert result.returncode == 0, result.stderr
    return "qa"


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_LM_RECIPE, encoding="utf-8")
    return path


def cli_json(*args: str) -> dict:
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a TensorBoard log folder, read by TensorBoard itself (all points kept)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={SCALARS: 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}
