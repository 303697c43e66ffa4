"""`airlock train lm --nproc 2` through the real CLI and job system: the job process supervises two
torchrun ranks (gloo on CPU) that read the same encrypted dataset through the key agent. The ranks
agree, the run matches one process accumulating both ranks' micro-batches, a cancel checkpoints
and a resume continues with the same two processes."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from appliance.catalog import open_catalog
from tests.appliance.train.conftest import cli_json, read_scalars
from tests.conftest import needs_loopback, run_cli

# 2 ranks x grad_accumulation 1 take the same micro-batches per step as 1 process x grad_accumulation 2;
# gloo sums the gradients in another order than one process does: float noise only.
DDP_REL_TOLERANCE = 1e-4
EQUIVALENCE_RECIPE = """\
max_steps = 6
eval_every = 3
batch_size = 1
max_length = 96
lr = 3e-3
dropout = 0.0
seed = 5
grad_accumulation = {accumulation}
"""
CANCEL_RECIPE = """\
max_steps = 400
eval_every = 2
batch_size = 1
max_length = 64
lr = 1e-3
seed = 5
"""


def _recipe(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _adapter(run_id: str) -> dict:
    from safetensors.torch import load

    from appliance.paths import airlock_home
    from appliance.train.artifacts import ADAPTER
    from appliance.train.runs import get_run
    from appliance.vault.lifecycle import keys_for
    from appliance.vault.store import read_bytes

    db = open_catalog()
    return load(read_bytes(db, keys_for(db, airlock_home()), airlock_home(), get_run(db, run_id).artifact, ADAPTER))


@needs_loopback  # gloo talks between the ranks over 127.0.0.1
def test_two_gloo_ranks_through_the_job_system_agree_and_match_one_process(qa_dataset, tmp_path):
    two = cli_json("train", "lm", "--base", "tiny-deepseek-r1", "--data", "qa", "--device", "cpu", "--nproc", "2",
                   "--recipe", str(_recipe(tmp_path, "ddp.toml", EQUIVALENCE_RECIPE.format(accumulation=1))),
                   "--wait", "--json")
    job, run = two["job"], two["run"]
    assert job["state"] == "succeeded" and run["state"] == "succeeded", (job["error"], job["hint"])
    assert job["params"]["nproc"] == 2 and job["device"] == "cpu"
    assert job["result"]["ranks"] == 2 and job["result"]["ranks_agree"] is True
    rank0, rank1 = job["result"]["rank_checksums"]
    assert rank0 == pytest.approx(rank1, rel=1e-6)

    one = cli_json("train", "lm", "--base", "tiny-deepseek-r1", "--data", "qa", "--device", "cpu",
                   "--recipe", str(_recipe(tmp_path, "one.toml", EQUIVALENCE_RECIPE.format(accumulation=2))),
                   "--wait", "--json")
    assert one["job"]["state"] == "succeeded" and one["job"]["params"]["nproc"] == 1
    assert "ranks" not in one["job"]["result"]
    ours, reference = run["metrics"], one["run"]["metrics"]
    assert ours["steps"] == reference["steps"] == 6
    assert [v for _, v in ours["train_losses"]] == pytest.approx([v for _, v in reference["train_losses"]],
                                                                   rel=DDP_REL_TOLERANCE)
    assert [s for s, _ in ours["val_losses"]] == [3, 6]
    assert [v for _, v in ours["val_losses"]] == pytest.approx([v for _, v in reference["val_losses"]],
                                                                 rel=DDP_REL_TOLERANCE)
    assert ours["test"]["loss"] == pytest.approx(reference["test"]["loss"], rel=DDP_REL_TOLERANCE)
    print(f"\nval loss {ours['initial_val_loss']:.4f} -> {ours['val_loss']:.4f}")
    assert ours["val_loss"] < ours["initial_val_loss"]  # it learned: 0.812 -> 0.663 with the fixed site secret

    ddp_adapter, single_adapter = _adapter(run["id"]), _adapter(one["run"]["id"])
    assert ddp_adapter.keys() == single_adapter.keys()
    # Adam divides each gradient by its own running size, so where a gradient is near zero (LoRA A while B is
    # still ~0) the summation order's float noise can move a weight by up to lr per step. Measured with the fixed
    # site secret: at most 1.5e-4 (one lora_A element; the next 4.7e-5), for weights of about 0.08; bound 1e-3.
    worst = max((tensor.double().sub(single_adapter[name].double()).abs().max().item(), name)
                for name, tensor in ddp_adapter.items())
    print(f"largest adapter difference DDP vs one process: {worst[0]:.2g} ({worst[1]})")
    assert worst[0] < 1e-3, worst
    assert sum(float(t.double().sum()) for t in ddp_adapter.values()) == pytest.approx(rank0, rel=1e-9)

    # Only rank 0 wrote: one train.start / train.finish pair, progress steps 1..6 once each.
    db = open_catalog()
    actions = [r[0] for r in db.execute("SELECT action FROM audit_log WHERE object = ? ORDER BY seq", [run["id"]])]
    assert actions == ["train.create", "train.start", "train.finish"]
    steps = [json.loads(r[0])["step"] for r in db.execute(
        "SELECT data FROM job_events WHERE job_id = ? AND kind = 'progress' AND data LIKE '%\"step\"%'", [job["id"]])]
    assert sorted(set(steps)) == steps and steps[-1] == 6
    logs = [r[0] for r in db.execute("SELECT message FROM job_events WHERE job_id = ? AND kind = 'log'", [job["id"]])]
    assert any("launching 2 training processes through torchrun (gloo on CPU)" in m for m in logs)
    assert any("2 of 2 ranks reported, in agreement" in m for m in logs)

    # Rank 0 alone wrote the TensorBoard curves: every step once, and the gradient norm DDP measured after its
    # all-reduce is the one process's (Adam's float noise moves it far less than the 1% allowed here).
    for run_id in (run["id"], one["run"]["id"]):
        assert run_cli("train", "export-curves", run_id, "--out", str(tmp_path / "tb")).returncode == 0
    ddp_curves, one_curves = read_scalars(tmp_path / "tb" / run["id"]), read_scalars(tmp_path / "tb" / one["run"]["id"])
    assert [s for s, _ in ddp_curves["train/grad_norm"]] == list(range(1, 7))
    norms = [(a, b) for (_, a), (_, b) in zip(ddp_curves["train/grad_norm"], one_curves["train/grad_norm"],
                                              strict=True)]
    print(f"largest relative grad-norm difference: {max(abs(a - b) / b for a, b in norms):.2g}")
    assert [a for a, _ in norms] == pytest.approx([b for _, b in norms], rel=1e-2)


def _progress_steps(db, job_id: str, after: int = 0) -> list[tuple[int, dict]]:
    rows = db.execute("SELECT id, data FROM job_events WHERE job_id = ? AND id > ? AND kind = 'progress' "
                      "ORDER BY id", [job_id, after])
    return [(r[0], d) for r in rows if "step" in (d := json.loads(r[1]))]


@needs_loopback
def test_cancel_and_kill_9_of_a_two_process_job_then_resume_with_two_processes(qa_dataset, tmp_path):
    from appliance.jobs.runner import wait_for

    recipe = _recipe(tmp_path, "long.toml", CANCEL_RECIPE)
    started = cli_json("train", "lm", "--base", "tiny-deepseek-r1", "--data", "qa", "--device", "cpu",
                       "--nproc", "2", "--recipe", str(recipe), "--json")
    run_id, job_id = started["run"]["id"], started["job"]["id"]
    db = open_catalog()
    deadline = time.monotonic() + 300
    while not any(d.get("val_loss") is not None for _, d in _progress_steps(db, job_id)):  # a checkpoint exists
        assert time.monotonic() < deadline, "no evaluation from the 2-process job"
        assert db.execute("SELECT state FROM jobs WHERE id = ?", [job_id]).fetchone()[0] in ("queued", "running")
        time.sleep(0.05)
    cancelled = run_cli("jobs", "cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stderr
    job = wait_for(db, job_id, timeout_s=300)
    assert job.state == "cancelled", (job.state, job.error, job.hint)
    assert job.result["checkpointed"] and job.result["ranks"] == 2 and job.result["ranks_agree"]
    stopped_at = job.result["steps"]
    assert 2 <= stopped_at < 400
    assert cli_json("train", "show", run_id, "--json")["run"]["state"] == "cancelled"

    # A resume keeps the world size: another one is refused with one line, and nothing starts.
    refused = run_cli("train", "lm", "--resume", run_id, "--nproc", "1")
    assert refused.returncode == 2 and "trains in 2 process(es)" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 2
    assert cli_json("jobs", "show", job_id, "--json")["job"]["state"] == "cancelled"

    # `airlock jobs resume` relaunches both ranks, which continue right after the step rank 0 checkpointed.
    mark = _progress_steps(db, job_id)[-1][0]
    resumed = run_cli("jobs", "resume", job_id)
    assert resumed.returncode == 0, resumed.stderr
    first = _wait_for_step(db, job_id, mark, lambda d: True)["step"]
    assert first == stopped_at + 1

    # kill -9 of one rank (out of memory, an operator's mistake): the supervisor ends the job `interrupted`, and
    # `train lm --resume` goes on from the last evaluation's checkpoint with both ranks again ...
    _wait_for_step(db, job_id, mark, lambda d: d["step"] > first and d.get("val_loss") is not None)
    os.kill(_rank_pid(job_id, 1), signal.SIGKILL)
    job = wait_for(db, job_id, timeout_s=300)
    assert job.state == "interrupted", (job.state, job.error, job.hint)
    assert "training rank(s) 1 of 2 ended without reporting" in job.error and "airlock jobs resume" in job.hint
    assert cli_json("train", "show", run_id, "--json")["run"]["state"] == "interrupted"
    mark = _progress_steps(db, job_id)[-1][0]
    killed_at = max(d["step"] for _, d in _progress_steps(db, job_id))
    resumed = cli_json("train", "lm", "--resume", run_id, "--json")
    assert resumed["job"]["params"]["nproc"] == 2 and resumed["job"]["device"] == "cpu"
    first = _wait_for_step(db, job_id, mark, lambda d: True)["step"]
    assert first > stopped_at + 1 and (first - 1) % 2 == 0 and first <= killed_at + 1

    # kill -9 of the job process itself: torchrun dies with it and stops the ranks (they checkpoint first);
    # no rank outlives it, and job and run end `interrupted` together.
    ranks = [_rank_pid(job_id, 0), _rank_pid(job_id, 1)]
    os.kill(db.execute("SELECT pid FROM jobs WHERE id = ?", [job_id]).fetchone()[0], signal.SIGKILL)
    deadline = time.monotonic() + 120
    while any(_running(pid) for pid in ranks):
        assert time.monotonic() < deadline, "a rank outlived the job process"
        time.sleep(0.1)
    assert wait_for(db, job_id, timeout_s=60).state == "interrupted"
    assert cli_json("train", "show", run_id, "--json")["run"]["state"] == "interrupted"
    actions = [r[0] for r in db.execute("SELECT action FROM audit_log WHERE object = ? ORDER BY seq", [run_id])]
    assert actions == ["train.create", "train.start", "train.cancel", "train.resume", "train.interrupted",
                       "train.resume", "train.interrupted"]


def _wait_for_step(db, job_id: str, after: int, predicate) -> dict:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for _, data in _progress_steps(db, job_id, after):
            if predicate(data):
                return data
        time.sleep(0.05)
    raise AssertionError(f"no such progress from {job_id}")


def _rank_pid(job_id: str, rank: int) -> int:
    """The process of one rank: runs appliance.train.ddp for this job, started by torchrun with RANK=rank."""
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"appliance.train.ddp" in cmdline and job_id.encode() in cmdline and b"torch.distributed.run" not in \
                cmdline and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no rank {rank} of {job_id} is running")


@needs_loopback
def test_a_ranks_own_error_fails_the_job_with_its_message_and_hint(qa_dataset, tmp_path, unlock):
    from appliance.jobs.runner import wait_for

    started = cli_json("train", "lm", "--base", "tiny-deepseek-r1", "--data", "qa", "--device", "cpu", "--nproc", "2",
                       "--recipe", str(_recipe(tmp_path, "ddp.toml", EQUIVALENCE_RECIPE.format(accumulation=1))),
                       "--json")
    assert run_cli("vault", "lock").returncode == 0  # before the ranks ask the key agent for the data keys
    job = wait_for(open_catalog(), started["job"]["id"], timeout_s=300)
    assert job.state == "failed", (job.state, job.error)
    assert job.error.startswith("training rank ") and "vault is locked" in job.error
    assert "airlock vault unlock" in job.hint
    shown = cli_json("train", "show", started["run"]["id"], "--json")["run"]
    assert shown["state"] == "failed" and "vault is locked" in shown["error"]


def _one_line_error(*args: str, env: dict[str, str] | None = None) -> str:
    result = run_cli(*args, env=env)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), result.stderr
    return result.stderr


def test_bad_process_counts_are_refused_with_one_line_before_anything_starts():
    lm = ["train", "lm", "--base", "tiny-deepseek-r1", "--data", "qa"]
    no_gpu = {"CUDA_VISIBLE_DEVICES": ""}
    assert "--nproc 0: a run needs at least one training process" in _one_line_error(*lm, "--nproc", "0")
    assert "--nproc -2" in _one_line_error(*lm, "--device", "cpu", "--nproc", "-2")
    three = _one_line_error(*lm, "--device", "cuda:0,1,2", "--nproc", "3", env=no_gpu)
    assert "no NVIDIA GPU is visible" in three and "--device cpu --nproc 3" in three
    one_named = _one_line_error(*lm, "--device", "cuda:0", "--nproc", "3", env=no_gpu)
    assert "one process per GPU and --device names one GPU" in one_named and "cuda:0,1,2" in one_named
    assert "names a GPU twice" in _one_line_error(*lm, "--device", "cuda:1,1", env=no_gpu)
    assert "is not auto, cpu or cuda:N" in _one_line_error(*lm, "--device", "cuda:0,x")
    cores = _one_line_error(*lm, "--device", "cpu", "--nproc", "10000")
    assert "--nproc 10000 on CPU: this machine has" in cores
    classifier = _one_line_error("train", "classifier", "--base", "tiny-resnet-cls", "--data", "x", "--device", "cpu",
                                 "--nproc", "2")
    assert "trains in one process" in classifier and "airlock train lm" in classifier
    assert cli_json("jobs", "list", "--json")["jobs"] == []


def test_process_plans_on_a_machine_with_two_gpus(tmp_path, monkeypatch):
    from appliance.train.jobs import plan_processes, visible_gpu_count
    from appliance.train.runs import RunError

    dev = tmp_path / "dev"  # what the driver creates: one node per GPU, plus control nodes that are not GPUs
    dev.mkdir()
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        (dev / name).touch()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_gpu_count(dev) == 2 and visible_gpu_count(tmp_path) == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert visible_gpu_count(dev) == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpu_count(dev) == 0

    assert plan_processes("lm", "auto", None, gpus=2) == ("cuda:0", 1)
    assert plan_processes("lm", "auto", 2, gpus=2) == ("cuda:0,1", 2)
    assert plan_processes("lm", "cuda:1,0", None, gpus=2) == ("cuda:1,0", 2)
    assert plan_processes("lm", "cuda:0,1", 2, gpus=2) == ("cuda:0,1", 2)
    assert plan_processes("lm", "auto", 2, gpus=0) == ("cpu", 2)
    assert plan_processes("classifier", "auto", None, gpus=2) == ("cuda:0", 1)
    with pytest.raises(RunError, match=r"3 GPU\(s\) asked for, 2 visible .*cuda:2 is not there") as too_many:
        plan_processes("lm", "auto", 3, gpus=2)
    assert "cuda:0,1" in too_many.value.hint
    with pytest.raises(RunError, match="cuda:2 is not there"):
        plan_processes("lm", "cuda:0,2", None, gpus=2)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def test_a_job_on_several_gpus_holds_the_lock_of_each_of_them(airlock_home):
    import fcntl

    from appliance.jobs import records
    from appliance.jobs.runner import JobContext, _device_lock, gpu_indices

    assert gpu_indices("cuda:1,0") == [1, 0] and gpu_indices("cuda:3") == [3] and gpu_indices("cpu") == []
    db = open_catalog()
    job = records.create_job(db, "train", {"nproc": 2}, device="cuda:1,0", actor="test")

    def free(index: int) -> bool:
        with open(airlock_home / "locks" / f"cuda-{index}.lock", "w") as other:  # another job's attempt
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(other, fcntl.LOCK_UN)
            return True

    with _device_lock(JobContext(db, job, airlock_home)):
        assert not free(0) and not free(1)
        assert free(2)  # a GPU the job does not use stays free for others
    assert free(0) and free(1)
