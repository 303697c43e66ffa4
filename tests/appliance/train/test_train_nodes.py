"""`airlock train lm --nnodes 2 --node-rank 0|1 --master-addr HOST` through the real CLI and job system:
two "machines" on loopback (two job processes, each supervising one torchrun rank, gloo), meeting through
torchrun's static rendezvous. Node 0 records the run; node 1's run row says where. A node with other
inputs fails every rank before step 1; a node that cannot join fails after the join timeout; bad flags
are one line each. Both "nodes" share one appliance home here (one vault, one dataset): on real machines
each has its own, holding the same dataset version (docs/operator-guide.md)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO, needs_loopback, run_cli

# 2 nodes x 1 rank x grad_accumulation 1 take the same micro-batches per step as 1 process x grad_accumulation 2;
# gloo sums the gradients in another order than one process does: float noise only (as test_train_ddp_job.py).
REL_TOLERANCE = 1e-4
RECIPE = """\
max_steps = 4
eval_every = 2
batch_size = 1
max_length = 96
lr = 3e-3
dropout = 0.0
seed = {seed}
grad_accumulation = {accumulation}
"""
# Three trainings share two cores here: OpenMP's spinning threads would starve each other on a loaded machine.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recipe(tmp_path: Path, name: str, seed: int = 5, accumulation: int = 1) -> str:
    path = tmp_path / name
    path.write_text(RECIPE.format(seed=seed, accumulation=accumulation), encoding="utf-8")
    return str(path)


def _node(rank: int, port: int, recipe: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "airlock"), "train", "lm", "--base", "tiny-deepseek-r1", "--data", "qa",
                             "--device", "cpu", "--recipe", recipe, "--nnodes", "2", "--node-rank", str(rank),
                             "--master-addr", "127.0.0.1", "--master-port", str(port), *extra, "--wait", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, **ONE_THREAD})


def _both(*nodes: subprocess.Popen) -> list[tuple[int, str, str]]:
    try:
        return [(node.wait(timeout=300), *node.communicate()) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()


@pytest.mark.slow  # five trainings (two pairs of nodes, one process), a failed join: 102-223 s at load ~10 on 2 cores
@needs_loopback  # gloo and the rendezvous talk over 127.0.0.1
def test_two_nodes_on_loopback_through_the_cli_match_one_process(qa_dataset, tmp_path):
    # A node whose inputs differ (here its recipe's seed) stops every rank before step 1, with one line.
    port = _free_port()
    outcomes = _both(_node(0, port, _recipe(tmp_path, "a.toml")), _node(1, port, _recipe(tmp_path, "b.toml", seed=6)))
    for code, _, err in outcomes:
        assert code == 2, err
        assert "node 1 trains on recipe hash" in err and "every node must train on the same inputs" in err, err
        assert "Traceback" not in err
    jobs = {row[0]: row[1] for row in run_cli_json_rows()}
    assert list(jobs.values()).count("failed") == 2

    # The same inputs: one run over two machines, recorded on node 0.
    port = _free_port()
    recipe = _recipe(tmp_path, "two.toml")
    (code0, out0, err0), (code1, out1, err1) = _both(_node(0, port, recipe), _node(1, port, recipe))
    assert (code0, code1) == (0, 0), (err0[-2000:], err1[-2000:])
    node0, node1 = json.loads(out0), json.loads(out1)
    assert node0["run"]["state"] == "succeeded" and node0["run"]["artifact"]
    assert node0["job"]["params"]["nodes"] == {"count": 2, "rank": 0, "master_addr": "127.0.0.1", "master_port": port,
                                               "join_timeout_s": 600}
    assert node0["job"]["result"]["ranks"] == 2
    assert node1["run"]["state"] == "succeeded" and node1["run"]["artifact"] is None
    assert node1["job"]["result"]["recorded_on"] == f"node 0 (127.0.0.1:{port})"
    assert node1["run"]["metrics"] == {"steps": 4, "total_steps": 4, "node_rank": 1, "nnodes": 2}
    assert node1["job"]["result"]["rank_checksums"][0] == pytest.approx(node0["job"]["result"]["rank_checksums"][0],
                                                                        rel=1e-6)

    reference = run_cli("train", "lm", "--base", "tiny-deepseek-r1", "--data", "qa", "--device", "cpu",
                        "--recipe", _recipe(tmp_path, "one.toml", accumulation=2), "--wait", "--json", env=ONE_THREAD)
    assert reference.returncode == 0, reference.stderr
    one = json.loads(reference.stdout)
    ours, reference = node0["run"]["metrics"], one["run"]["metrics"]
    assert ours["steps"] == reference["steps"] == 4
    assert [v for _, v in ours["train_losses"]] == pytest.approx([v for _, v in reference["train_losses"]],
                                                                   rel=REL_TOLERANCE)
    assert [v for _, v in ours["val_losses"]] == pytest.approx([v for _, v in reference["val_losses"]],
                                                                 rel=REL_TOLERANCE)

    # Node 1 alone: nobody at the master's port, so it cannot join; one line after the join timeout.
    alone = run_cli("train", "lm", "--base", "tiny-deepseek-r1", "--data", "qa", "--device", "cpu", "--recipe", recipe,
                    "--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1", "--master-port",
                    str(_free_port()), "--join-timeout", "3", "--wait", env=ONE_THREAD)
    assert alone.returncode == 2
    assert "node 1 of 2 could not join the others at 127.0.0.1:" in alone.stderr and "within 3 s" in alone.stderr
    assert "Traceback" not in alone.stderr


def run_cli_json_rows() -> list[tuple[str, str]]:
    from appliance.catalog import open_catalog

    return [tuple(r) for r in open_catalog().execute("SELECT id, state FROM jobs")]


@pytest.mark.parametrize(("flags", "expected"), [
    (["--nnodes", "2", "--node-rank", "2", "--master-addr", "127.0.0.1"], "--node-rank 2 with --nnodes 2: node ranks "
                                                                           "run from 0 to 1"),
    (["--nnodes", "2", "--node-rank", "1"], "--nnodes 2 needs --master-addr"),
    (["--nnodes", "2", "--master-addr", "127.0.0.1"], "--nnodes 2 needs --node-rank"),
    (["--node-rank", "1"], "--node-rank is for a run over several machines, and --nnodes is 1"),
    (["--nnodes", "2", "--node-rank", "1", "--master-addr", "h", "--task", "t"], "--task on node 1: only node 0"),
])
def test_bad_node_flags_are_one_line_each(flags, expected, tmp_path):
    """Refused before the vault, the catalog or torch is touched (no appliance home exists here)."""
    result = run_cli("train", "lm", "--base", "tiny-deepseek-r1", "--data", "qa", *flags,
                     env={"AIRLOCK_HOME": str(tmp_path / "none")})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert expected in lines[0] and len(lines) == 2 and lines[1].startswith("hint:"), result.stderr
    assert not (tmp_path / "none").exists()
