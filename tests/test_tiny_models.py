"""The committed tiny models are exactly what `models/build_tiny_models.py` produces.

Regenerates all three into a temporary directory (about two minutes on two cores) and compares
every committed file by SHA-256, so nobody can swap the weights or the tokenizer unnoticed.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

MODELS = ("tiny-deepseek-r1", "tiny-deepseek-coder", "tiny-deepseek-v3", "tiny-resnet-cls")


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for name in MODELS for p in sorted((root / name).rglob("*")) if p.is_file()}


def test_committed_models_equal_a_fresh_regeneration(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "models" / "build_tiny_models.py"), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    committed, fresh = _hashes(REPO / "models"), _hashes(tmp_path)
    assert "tiny-deepseek-r1/model.safetensors" in committed
    assert committed == fresh
