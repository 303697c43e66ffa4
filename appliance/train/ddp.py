"""A training job over several processes: the job process supervises N ranks launched through torchrun.

    airlock train lm --base tiny-deepseek-r1 --data qa --device cpu --nproc 2 --wait   # 2 CPU ranks, gloo
    airlock train lm --base deepseek-r1-distill-qwen-7b --data qa --device cuda:0,1      # 2 GPUs, NCCL

The job process (`airlock jobs run ID`) stays the supervisor: it owns the job row (state,
heartbeat through its pid, events), holds the lock of every GPU the job uses, and runs

    python -m torch.distributed.run --nproc-per-node N --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:0 \\
        -m appliance.train.ddp JOB_ID RANKS_DIR

as a child in its own session, which dies with the supervisor (PR_SET_PDEATHSIG: torchrun then
stops its ranks with SIGTERM). Each rank (`main` below) takes the data keys from the key agent
exactly as the job does (same uid, same vault, checked by the agent), decrypts the same pinned
data in memory and runs `appliance.train.jobs._train_lm` with its rank: rank 0 writes progress
events, checkpoints, the adapter and the run row; the others only read. No key or plaintext
passes through argv, the environment or the disk.

Stop and outcome: SIGTERM or `airlock jobs cancel` reach the supervisor, which sends SIGTERM to
the ranks; they agree on the step to stop at (an all-reduce in `train_lora`), rank 0 checkpoints,
and the job ends `cancelled`. Each rank leaves one small JSON outcome (state, error and hint, its
adapter's checksum; never data) in RANKS_DIR, which the supervisor maps to the job's state:
all ranks ok -> rank 0's result (plus the ranks' checksums, which must agree); a rank's error ->
`failed` with that error and hint; a rank gone without a word (kill -9, out of memory) ->
`interrupted`, resumable from rank 0's last checkpoint with the same number of processes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.errors import AirlockError
from appliance.jobs.runner import CANCEL_POLL_S, JobContext, JobInterrupted, jobs_dir, process_start_time

if TYPE_CHECKING:
    from appliance.train.runs import Run

RANK_MODULE = "appliance.train.ddp"
SUPERVISOR_ENV = "AIRLOCK_JOB_SUPERVISOR"
"""`pid:start time` of the supervising job process: a rank whose supervisor is gone stops."""
COLLECTIVE_TIMEOUT_S = 2 * 3600  # rank 0 alone hashes the base model and writes checkpoints; the others wait
CHECKSUM_REL_TOLERANCE = 1e-6    # DDP all-reduces gradients: the ranks' adapters are equal up to float noise
POLL_S = 0.2
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In torchrun, before exec: SIGTERM when the supervisor dies (even by kill -9), so no rank outlives it."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _ranks_of(pid: int) -> list[int]:
    """The rank processes torchrun `pid` started (its children that run this module)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == pid and RANK_MODULE.encode() in cmdline:
            found.append(int(entry.name))
    return found


def supervise_ranks(ctx: JobContext, run: Run, nproc: int) -> dict[str, Any]:
    """The `train` job with nproc > 1: launch the ranks, forward a stop, map their outcome to the job's."""
    from appliance.train.nodes import Nodes

    if run.kind != "lm":
        raise AirlockError(f"run {run.id} is a {run.kind} run; only `airlock train lm` trains in several processes",
                           hint="start it again without --nproc")
    nodes = Nodes.from_params(ctx.job.params.get("nodes"))
    mine = list(range(nodes.rank * nproc, (nodes.rank + 1) * nproc))  # this machine's global ranks
    if nodes.rank:  # node 0's rank 0 records the run; here the run row only follows this machine's part
        from appliance.train import runs

        runs.mark_running(ctx.db, run, base_hash=run.base_hash, lineage={
            "node_rank": nodes.rank, "nnodes": nodes.count, "recorded_on": f"node 0 ({nodes.where()})",
            "device": ctx.job.device})
    ranks_dir = jobs_dir(ctx.home) / f"{ctx.job.id}.ranks"
    shutil.rmtree(ranks_dir, ignore_errors=True)  # outcomes of an earlier attempt must not count
    ranks_dir.mkdir(mode=0o700)
    me = os.getpid()
    env = {**os.environ, "AIRLOCK_HOME": str(ctx.home), SUPERVISOR_ENV: f"{me}:{process_start_time(me)}"}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # the cores, shared
    command = [sys.executable, "-I", "-m", "torch.distributed.run", *nodes.torchrun_args(ctx.job.id),
               "--nproc-per-node", str(nproc), "--max-restarts", "0", "--log-dir", str(ranks_dir / "torchrun"),
               "-m", RANK_MODULE, ctx.job.id, str(ranks_dir)]
    backend = "NCCL, one process per GPU" if ctx.job.device.startswith("cuda") else "gloo on CPU"
    where = (f" as node {nodes.rank} of {nodes.count} (global ranks {mine[0]}-{mine[-1]}), meeting at "
             f"{nodes.where()} within {nodes.join_timeout_s} s" if nodes.several else "")
    ctx.log(f"launching {nproc} training processes through torchrun ({backend}){where}")
    sys.stdout.flush()
    sys.stderr.flush()
    # stdout and stderr stay the job's log (0600): torchrun's and the ranks' lines land there.
    # cwd: the ranks are `python -u -m` children of torchrun (not -I), so they start in the job's own 0700 folder,
    # never in a directory someone could plant an `appliance/` package in.
    torchrun = subprocess.Popen(command, stdin=subprocess.DEVNULL, env=env, cwd=ranks_dir, start_new_session=True,
                                preexec_fn=_die_with_parent)  # the supervisor runs no threads
    signalled: set[int] = set()
    try:
        while torchrun.poll() is None:
            if ctx.should_stop():  # SIGTERM or `jobs cancel`: every rank checkpoints at the same step
                for pid in set(_ranks_of(torchrun.pid)) - signalled:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
                    signalled.add(pid)
            time.sleep(POLL_S)
    finally:
        if torchrun.poll() is None:  # the supervisor itself failed: take torchrun and its ranks down with it
            torchrun.terminate()
            torchrun.wait()
    outcomes = _read_outcomes(ranks_dir, mine)
    started = any((ranks_dir / f"rank-{rank}.started").exists() for rank in mine)
    shutil.rmtree(ranks_dir, ignore_errors=True)
    if nodes.several and not started and not ctx.should_stop():
        raise AirlockError(f"node {nodes.rank} of {nodes.count} could not join the others at {nodes.where()} within "
                           f"{nodes.join_timeout_s} s (torchrun exit code {torchrun.returncode})",
                           hint="start the same command on every node within --join-timeout, each with its own "
                                "--node-rank and the same --nnodes, --master-addr and --master-port; node 0 must be "
                                "reachable on that port (firewall) and the port free there")
    if nodes.rank:
        return _node_result(ctx, run, nodes, nproc, outcomes, torchrun.returncode)
    return _job_result(ctx, run, nproc * nodes.count, outcomes, torchrun.returncode, mine)


def _read_outcomes(ranks_dir: Path, ranks: list[int]) -> dict[int, dict[str, Any]]:
    found = {}
    for rank in ranks:
        with contextlib.suppress(OSError, ValueError):
            found[rank] = json.loads((ranks_dir / f"rank-{rank}.json").read_text())
    return found


def _node_result(ctx: JobContext, run: Run, nodes: Any, nproc: int, outcomes: dict[int, dict[str, Any]],
                 exit_code: int) -> dict[str, Any]:
    """Another machine than node 0: its ranks' outcome becomes its job's, and its run row says where the run is
    recorded (node 0 wrote the metrics, the adapter and the registration)."""
    from appliance.train import runs

    mine = list(range(nodes.rank * nproc, (nodes.rank + 1) * nproc))
    done = [o for _, o in sorted(outcomes.items()) if o["state"] == "ok"]
    if len(done) == nproc:
        checksums = [o["result"]["adapter_checksum"] for o in done]
        steps = done[0]["result"]["steps"]
        recorded_on = f"node 0 ({nodes.where()})"
        total = done[0]["result"].get("total_steps", steps)
        stopped = steps < total and not done[0]["result"].get("stopped_early")
        metrics = {"steps": steps, "total_steps": total, "node_rank": nodes.rank, "nnodes": nodes.count}
        runs.finish_run(ctx.db, run.id, "cancelled" if stopped else "succeeded", metrics=metrics)
        ctx.log(f"node {nodes.rank}: {nproc} rank(s) finished at step {steps}; the run is recorded on {recorded_on}")
        return {"run": run.id, "steps": steps, "node_rank": nodes.rank, "nnodes": nodes.count,
                "recorded_on": recorded_on, "ranks": nproc, "rank_checksums": checksums,
                **({"checkpointed": True} if stopped else {})}
    return _job_result(ctx, run, nproc * nodes.count, outcomes, exit_code, mine)


def _job_result(ctx: JobContext, run: Run, world: int, outcomes: dict[int, dict[str, Any]],
                exit_code: int, mine: list[int]) -> dict[str, Any]:
    """Rank 0's result when it finished (or checkpointed on a stop); else the cause, in this order: a
    rank's own error (vault locked, bad data) -> failed; a rank gone without a word -> cancelled
    when a stop was asked for, else interrupted (the others' errors are then its echo); else the
    first internal error -> failed. `mine`: this machine's global ranks (all of them on one machine)."""
    from appliance.train import runs

    nproc = world
    failures = [o for _, o in sorted(outcomes.items()) if o["state"] == "failed"]
    missing = [r for r in mine if r not in outcomes]
    lead = outcomes.get(0)
    if lead and lead["state"] == "ok" and (not failures or lead["result"].get("artifact")):
        for failure in failures:  # after rank 0 stored the adapter: the run stands, the log says what else broke
            ctx.log(f"rank {failure['rank']} ended with an error after rank 0 finished: {failure['error']}")
        checksums = [o["result"]["adapter_checksum"] for _, o in sorted(outcomes.items()) if o["state"] == "ok"]
        agree = all(math.isclose(c, checksums[0], rel_tol=CHECKSUM_REL_TOLERANCE, abs_tol=1e-9) for c in checksums)
        here = " on this node" if len(mine) < nproc else ""
        ctx.log(f"{len(checksums)} of {len(mine)} ranks{here} reported, {'in agreement' if agree else 'DISAGREEING'}: "
                "adapter checksums " + ", ".join(f"{c:.10g}" for c in checksums))
        result = {k: v for k, v in lead["result"].items() if k not in ("rank", "adapter_checksum")}
        return {**result, "ranks": nproc, "rank_checksums": checksums, "ranks_agree": agree}
    own = [f for f in failures if not f.get("internal")]
    if own or (failures and not missing):
        first = (own or failures)[0]
        raise AirlockError(f"training rank {first['rank']} of {nproc}: {first['error']}",
                           hint=first.get("hint") or f"see the job's log {jobs_dir(ctx.home) / (ctx.job.id + '.log')}")
    gone = ", ".join(map(str, missing))
    if ctx.should_stop():
        with contextlib.suppress(AirlockError):
            if runs.get_run(ctx.db, run.id).state in ("queued", "running"):
                runs.finish_run(ctx.db, run.id, "cancelled")
        ctx.log(f"rank(s) {gone} stopped without reporting (the stop came before training began)")
        return {"run": run.id, "ranks": nproc, "checkpointed": False}
    raise JobInterrupted(f"training rank(s) {gone} of {nproc} ended without reporting (killed or out of memory; "
                         f"torchrun exit code {exit_code})",
                         hint=f"resume from the last checkpoint with `airlock jobs resume {ctx.job.id}` (same "
                              "number of processes); if it recurs, check memory (`dmesg`)")


# --- one rank (run by torchrun) ------------------------------------------------------------------------------------

@dataclass
class RankContext(JobContext):
    """A rank's view of the job: rank 0 reports progress and logs; a stop comes by SIGTERM or when
    the supervising job process is gone."""

    rank: int = 0
    supervisor: str = ""

    def progress(self, message: str = "", **data: Any) -> None:
        if self.rank == 0:
            super().progress(message, **data)

    def log(self, message: str) -> None:
        if self.rank == 0:
            super().log(message)

    def should_stop(self) -> bool:
        if not self._terminated[0] and time.monotonic() - self._last_poll >= CANCEL_POLL_S:
            self._last_poll = time.monotonic()
            if self.supervisor_gone:
                self._terminated[0] = True
        return self._terminated[0]

    @property
    def supervisor_gone(self) -> bool:
        """The job process died (kill -9): its ranks stop, and the run is left for `reconcile_jobs`."""
        pid, _, started = self.supervisor.partition(":")
        return bool(pid) and process_start_time(int(pid)) != started


def _write_outcome(ranks_dir: Path, rank: int, outcome: dict[str, Any]) -> None:
    from appliance.audit import canonical_json

    final = ranks_dir / f"rank-{rank}.json"
    temp = final.with_name(f".{final.name}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(canonical_json(outcome))
    os.replace(temp, final)


def main(argv: list[str] | None = None) -> int:
    """One rank: `python -m appliance.train.ddp JOB_ID RANKS_DIR` under torchrun (RANK, WORLD_SIZE, ...)."""
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))  # first: a stop must never kill a rank
    job_id, ranks_dir = (argv or sys.argv[1:])[:2]
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    with contextlib.suppress(OSError):  # the rendezvous succeeded: the supervisor tells a crash from a failed join
        (Path(ranks_dir) / f"rank-{rank}.started").touch(mode=0o600)
    outcome: dict[str, Any] = {"rank": rank}
    try:
        outcome.update(state="ok", result=_run_rank(job_id, rank, local_rank, stop))
    except AirlockError as exc:
        outcome.update(state="failed", error=exc.message, hint=exc.hint)
    except Exception as exc:
        # Frames only, into the job's 0600 log: the exception's message may hold data.
        sys.stderr.write(f"rank {rank}:\n" + "".join(traceback.format_tb(exc.__traceback__))
                         + type(exc).__name__ + "\n")
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        outcome.update(state="failed", internal=True,
                       error=f"internal error ({type(exc).__name__} at {Path(frame.filename).name}:{frame.lineno})")
    _write_outcome(Path(ranks_dir), rank, outcome)
    with contextlib.suppress(Exception):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0 if outcome["state"] == "ok" else 1


def _run_rank(job_id: str, rank: int, local_rank: int, stop: list[bool]) -> dict[str, Any]:
    from datetime import timedelta

    from appliance.audit import set_process_actor
    from appliance.catalog import open_catalog
    from appliance.jobs.records import get_job
    from appliance.paths import airlock_home
    from appliance.train import runs
    from appliance.train.jobs import _train_lm
    from appliance.vault.keys import disable_core_dumps

    disable_core_dumps()  # a rank holds data keys
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():  # the supervisor narrowed CUDA_VISIBLE_DEVICES to the job's GPUs
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    db = open_catalog(migrate=False)
    job = get_job(db, job_id)
    set_process_actor(job.actor)  # audit rows (vault reads) name who started the job
    ctx = RankContext(db, job, airlock_home(), _terminated=stop, rank=rank,
                      supervisor=os.environ.get(SUPERVISOR_ENV, ""))
    return _train_lm(ctx, runs.run_for_job(db, job_id), rank=rank)


if __name__ == "__main__":
    sys.exit(main())
