"""Training over several machines: torchrun's static rendezvous, one appliance per node.

    # on node 0 (10.0.0.5) and on node 1, within the join timeout of each other:
    airlock train lm --base B --data qa --recipe r.toml --nnodes 2 --node-rank 0 --master-addr 10.0.0.5
    airlock train lm --base B --data qa --recipe r.toml --nnodes 2 --node-rank 1 --master-addr 10.0.0.5

Each node runs its own appliance (same bundle, its own vault and catalog holding the same dataset
version) and its own `train` job, whose supervisor launches `--nproc` local ranks through

    torchrun --nnodes N --node-rank R --master-addr HOST --master-port P --rdzv-conf timeout=T ...

(static rendezvous: node R's ranks are the global ranks R*nproc .. R*nproc+nproc-1; node 0 hosts the
TCP store at HOST:P). Decisions (ADR 0020):

- Node 0 records the run: global rank 0 writes the run row, checkpoints, the adapter and the
  registration into node 0's catalog and vault, exactly as on one machine. Another node's run row
  ends `succeeded` without an artifact, its metrics naming the node and where the run is recorded.
- Before step 1 every rank sends node 0 the fingerprint of what it is about to train on (dataset
  content hash and version, recipe hash, base model, tokenizer hash, processes per node); a node
  whose fingerprint differs fails every rank with one line naming the node and the field, before
  any training step (`check_same_inputs`).
- A node that cannot join (node 0 not up, a wrong address or port, a firewall) fails after the join
  timeout with one line and a hint; the supervisor tells it from a crash by the ranks' start markers.
- Checkpoints live in node 0's vault; a resume (`airlock jobs resume` on every node) has global rank
  0 read the checkpoint and send it to every rank (`BroadcastCheckpoints`), since the other nodes'
  vaults never hold it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from appliance.errors import AirlockError

DEFAULT_MASTER_PORT = 29500  # torchrun's
DEFAULT_JOIN_TIMEOUT_S = 600  # torchrun's static rendezvous default
SIGNATURE_FIELDS = ("base_model", "tokenizer_hash", "dataset_name", "dataset_version", "dataset_hash", "recipe_hash",
                    "nproc")


@dataclass(frozen=True)
class Nodes:
    """Where this job stands among the machines training one run (count 1: one machine)."""

    count: int = 1
    rank: int = 0
    master_addr: str | None = None
    master_port: int = DEFAULT_MASTER_PORT
    join_timeout_s: int = DEFAULT_JOIN_TIMEOUT_S

    @property
    def several(self) -> bool:
        return self.count > 1

    def to_params(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> Nodes:
        return cls(**params) if params else cls()

    def torchrun_args(self, job_id: str) -> list[str]:
        """torchrun's rendezvous arguments: c10d on a free local port for one machine, static on node 0's
        address for several (node ranks as given, so node 0 is the one that records the run)."""
        if not self.several:
            return ["--nnodes", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--rdzv-id", job_id]
        return ["--nnodes", str(self.count), "--node-rank", str(self.rank), "--master-addr", str(self.master_addr),
                "--master-port", str(self.master_port), "--rdzv-conf", f"timeout={self.join_timeout_s}"]

    def where(self) -> str:
        return f"{self.master_addr}:{self.master_port}"


def plan_nodes(kind: str, nnodes: int | None, node_rank: int | None, master_addr: str | None,
               master_port: int | None, join_timeout_s: int | None, task: str | None = None) -> Nodes:
    """The machines from `--nnodes/--node-rank/--master-addr/--master-port/--join-timeout`, refused with one line
    when they cannot describe one run."""
    count = 1 if nnodes is None else nnodes
    if count < 1:
        raise AirlockError(f"--nnodes {nnodes}: a run needs at least one machine",
                           hint="leave out --nnodes on one machine; --nnodes 2 on two")
    if count == 1:
        given = [flag for flag, value in (("--node-rank", node_rank), ("--master-addr", master_addr),
                                          ("--master-port", master_port), ("--join-timeout", join_timeout_s))
                 if value is not None and not (flag == "--node-rank" and value == 0)]
        if given:
            raise AirlockError(f"{given[0]} is for a run over several machines, and --nnodes is {count}",
                               hint="add --nnodes N (the number of machines), or leave out " + ", ".join(given))
        return Nodes()
    if kind != "lm":
        raise AirlockError(f"--nnodes {count}: `airlock train {kind}` trains on one machine",
                           hint="leave out --nnodes; several machines (torchrun) are for `airlock train lm`")
    if node_rank is None:
        raise AirlockError(f"--nnodes {count} needs --node-rank: this machine's number, 0 to {count - 1}",
                           hint="give node 0 (the machine at --master-addr, which records the run) --node-rank 0, "
                                "the others 1, 2, ...")
    if not 0 <= node_rank < count:
        raise AirlockError(f"--node-rank {node_rank} with --nnodes {count}: node ranks run from 0 to {count - 1}",
                           hint="number the machines 0 to N-1, each once; node 0 runs at --master-addr")
    if not master_addr:
        raise AirlockError(f"--nnodes {count} needs --master-addr: the address of node 0, where the machines meet",
                           hint="give every node (node 0 too) the same --master-addr HOST and --master-port PORT")
    port = DEFAULT_MASTER_PORT if master_port is None else master_port
    if not 1 <= port <= 65535:
        raise AirlockError(f"--master-port {port} is not a TCP port", hint=f"e.g. --master-port {DEFAULT_MASTER_PORT}")
    timeout = DEFAULT_JOIN_TIMEOUT_S if join_timeout_s is None else join_timeout_s
    if timeout < 1:
        raise AirlockError(f"--join-timeout {timeout}: the machines need at least a second to meet",
                           hint=f"leave it out ({DEFAULT_JOIN_TIMEOUT_S} s) or give the seconds to wait for the others")
    if task is not None and node_rank != 0:
        raise AirlockError(f"--task on node {node_rank}: only node 0 records and registers the run",
                           hint="give --task to node 0's command only")
    return Nodes(count, node_rank, master_addr, port, timeout)


def signature(run: Any, tokenizer_hash: str, nproc: int) -> dict[str, Any]:
    """What every node must train on identically (no record contents: names, versions, hashes)."""
    return {"base_model": run.base_model, "tokenizer_hash": tokenizer_hash, "dataset_name": run.dataset_name,
            "dataset_version": run.dataset_version, "dataset_hash": run.dataset_hash, "recipe_hash": run.recipe_hash,
            "nproc": nproc}


def check_same_inputs(mine: dict[str, Any], node: int) -> None:
    """A collective before step 1: every rank's signature against global rank 0's (node 0's). Every rank
    gathers the same list, so every rank raises the same one line, and no rank trains, on a mismatch."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"node": node, **mine})
    reference = gathered[0]
    for other in gathered[1:]:
        for field in SIGNATURE_FIELDS:
            if other[field] != reference[field]:
                raise AirlockError(
                    f"node {other['node']} trains on {field.replace('_', ' ')} {other[field]!s:.16} but node "
                    f"{reference['node']} on {reference[field]!s:.16}: every node must train on the same inputs",
                    hint="import the same dataset version (`airlock data export` / `import`), the same base model "
                         "and the same recipe on every node, and give every node the same --nproc")


class BroadcastCheckpoints:
    """The run's checkpoints over several machines: node 0's vault holds them (global rank 0 writes);
    `read_bytes` is a collective in which rank 0 reads and every rank receives the same bytes."""

    def __init__(self, store: Any, rank: int) -> None:
        self.store = store
        self.rank = rank

    def write_bytes(self, name: str, data: bytes) -> None:
        if self.rank == 0:
            self.store.write_bytes(name, data)

    def read_bytes(self, name: str) -> bytes | None:
        import torch.distributed as dist

        box = [self.store.read_bytes(name) if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]
