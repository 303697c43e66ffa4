"""Training curves as TensorBoard event files: kept in the vault, written out only when an operator asks.

    airlock train export-curves RUN --out DIR        # DIR/RUN/events.out.tfevents.<time>.airlock
    tensorboard --logdir DIR                         # on any machine with TensorBoard

What a run records, numbers only (never record contents, never class names):

    language models  train/loss, train/lr, train/grad_norm every step; val/loss at step 0 (the
                     untouched base) and at every evaluation; test/loss, test/perplexity,
                     test/token_accuracy (and test/rouge_l) at the last step
    classifiers      train/loss, train/lr, train/grad_norm every step; val/auc at every
                     evaluation; test/accuracy, test/auc at the last step

Where they live. The points travel inside the training checkpoint, so a resumed run continues
the same curve (no step twice, nothing lost before the checkpoint), and at every checkpoint and
at the end the job encrypts them as one event file into the vault object `curves-<run id>`
(kind `curves`, its own data key). Nothing under AIRLOCK_HOME is plaintext but the catalog, and
the appliance runs no TensorBoard server (it would open a port): `export_curves` decrypts the
file into a folder the operator names, with an audit row, and TensorBoard reads it anywhere.

The file is TensorBoard's own format, built in memory with tensorboardX's protocol buffers and
its masked CRC-32C (tensorboardX's writers only write to a path, and plaintext does not go to
disk here): one `file_version` event, then one `Event(step, wall_time, Summary(simple_value))`
per point, each framed as a TFRecord. tests/appliance/train/test_curves.py reads it back with
TensorBoard's EventAccumulator.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.errors import AirlockError

if TYPE_CHECKING:
    import sqlite_utils

    from appliance.train.runs import Run
    from appliance.vault.keys import KeyOps

EVENTS = "events.tfevents"
"""The event file's name inside the vault object."""
OBJECT_KIND = "curves"
FILE_VERSION = "brain.Event:2"
LM_TEST_TAGS = ("loss", "perplexity", "token_accuracy", "rouge_l")


def curves_object_id(run_id: str) -> str:
    return f"curves-{run_id}"


@dataclass
class Curves:
    """The scalars of one run in the order they were measured: [tag, step, value, unix time]."""

    points: list[list[Any]] = field(default_factory=list)
    _framed: bytearray = field(default_factory=bytearray, repr=False, compare=False)
    """The records of points[:_count], already encoded: each checkpoint frames only the new points."""
    _count: int = field(default=0, repr=False, compare=False)

    def add(self, step: int, values: dict[str, float | None], wall_time: float | None = None) -> None:
        """One point per tag at `step`; a None value (not measured) is left out."""
        import time

        now = time.time() if wall_time is None else wall_time
        for tag, value in values.items():
            if value is not None:
                self.points.append([tag, int(step), float(value), now])

    def tags(self) -> set[str]:
        return {p[0] for p in self.points}

    def series(self, tag: str) -> list[tuple[int, float]]:
        return [(p[1], p[2]) for p in self.points if p[0] == tag]

    def state(self) -> list[list[Any]]:
        """For a checkpoint: plain lists of str, int and float (loadable with torch.load(weights_only=True))."""
        return [list(p) for p in self.points]

    @classmethod
    def from_state(cls, state: Iterable[Iterable[Any]] | None) -> Curves:
        return cls([[str(t), int(s), float(v), float(w)] for t, s, v, w in (state or [])])


def event_file_bytes(curves: Curves, *, started: float | None = None) -> bytes:
    """The curves as one TensorBoard event file (TFRecord-framed `Event` protos), in memory."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.summary import scalar

    if curves._count > len(curves.points):  # the points were replaced: frame them all again
        curves._framed, curves._count = bytearray(), 0
    for tag, step, value, wall_time in curves.points[curves._count:]:
        curves._framed += _record(Event(wall_time=wall_time, step=step, summary=scalar(tag, value)))
    curves._count = len(curves.points)
    first = curves.points[0][3] if curves.points else 0.0
    header = _record(Event(wall_time=started if started is not None else first, file_version=FILE_VERSION))
    return header + bytes(curves._framed)


def _record(event: Any) -> bytes:
    """One TFRecord: length, its masked CRC-32C, the serialized event, its masked CRC-32C."""
    from tensorboardX.record_writer import masked_crc32c

    data = event.SerializeToString()
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


def lm_test_values(metrics: dict[str, Any] | None) -> dict[str, float | None]:
    """test/* points from an LM test report (numbers only; samples never go in)."""
    metrics = metrics or {}
    return {f"test/{name}": _finite(metrics.get(name)) for name in LM_TEST_TAGS}


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def save_curves(db: sqlite_utils.Database, keys: KeyOps, home: Path, run_id: str, curves: Curves) -> str:
    """Encrypt the curves' event file into `curves-<run id>` (created on first use, then replaced whole)."""
    from appliance.vault import records, store
    from appliance.vault.errors import ObjectError

    object_id = curves_object_id(run_id)
    try:
        records.dek(db, object_id)
    except ObjectError:
        store.create_object(db, keys, object_id, OBJECT_KIND)
    store.write_bytes(db, keys, home, object_id, EVENTS, event_file_bytes(curves), overwrite=True)
    return object_id


def export_curves(db: sqlite_utils.Database, keys: KeyOps, home: Path, run: Run, out: Path, *,
                  actor: str | None = None) -> Path:
    """Decrypt a run's event file into `out/<run id>/` (a TensorBoard log folder per run). Audited.

    `out` may hold other runs' folders (one `tensorboard --logdir out` compares them); the run's own
    folder must be new or empty, so an export never overwrites anything."""
    from appliance.audit import append_audit
    from appliance.catalog import transaction
    from appliance.vault import store

    object_id = curves_object_id(run.id)
    if EVENTS not in store.list_files(home, object_id):
        raise AirlockError(f"run {run.id} has no training curves yet",
                           hint="curves are stored at the run's first evaluation or checkpoint, and when it ends; "
                                f"see `airlock train show {run.id}`")
    data = store.read_bytes(db, keys, home, object_id, EVENTS)
    folder = Path(out) / run.id
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise AirlockError(f"{folder} is not empty: an export never overwrites",
                           hint="choose another --out folder, or remove that run folder first")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    started = _started(run)
    target = folder / f"events.out.tfevents.{started}.airlock"
    temp = folder / f".{target.name}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(temp, target)
    with transaction(db):
        append_audit(db, "train.export_curves", run.id, {"out": str(target.resolve()), "bytes": len(data),
                                                         "run_state": run.state}, actor=actor)
    return target


def _started(run: Run) -> int:
    from datetime import datetime

    stamp = run.started_at or run.created_at
    return int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
