"""Training curves as TensorBoard event files: written by a real training job into the vault (ciphertext
at rest), exported on request with an audit row, and read back by TensorBoard's own reader."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest

from appliance.train.curves import Curves, event_file_bytes
from tests.appliance.train.conftest import cli_json, corpus_chats, read_scalars
from tests.conftest import run_cli

LM_TAGS = {"train/loss", "train/lr", "train/grad_norm", "val/loss", "test/loss", "test/perplexity",
           "test/token_accuracy", "test/rouge_l"}
SMALL_RECIPE = """\
# 8 steps of batch 4 x 128 tokens: a few seconds on two CPU cores
max_steps = 8
eval_every = 4
batch_size = 4
max_length = 128
lr = 3e-3
seed = 3
max_grad_norm = 1.0
"""


def read_events(path: Path) -> list:
    """The Event protos of one file as written (TensorBoard's raw loader checks every record's CRC; its
    other loader would migrate the values to tensors)."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event

    return [Event.FromString(record) for record in RawEventFileLoader(str(path)).Load()]


def test_event_file_round_trips_through_tensorboard_and_a_checkpoint(tmp_path):
    import torch

    curves = Curves()
    curves.add(0, {"val/loss": 2.5}, wall_time=1000.0)
    for step in range(1, 301):
        curves.add(step, {"train/loss": 3.0 / step, "train/lr": 1e-4, "train/grad_norm": 0.5 + step,
                          "test/loss": None}, wall_time=1000.0 + step)  # None: not measured, left out
    curves.add(300, {"train/grad_norm": math.nan})  # an fp16 overflow step: kept, as TensorBoard shows it
    # A checkpoint holds the points as plain lists: loadable without pickle code.
    buffer = io.BytesIO()
    torch.save({"curves": curves.state()}, buffer)
    restored = Curves.from_state(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)["curves"])
    assert restored.points[:-1] == curves.points[:-1] and math.isnan(restored.points[-1][2])

    # Each checkpoint frames only the new points; the file is the same as one framed from scratch.
    event_file_bytes(restored)
    restored.add(301, {"val/loss": 1.5}, wall_time=2000.0)
    data = event_file_bytes(restored)
    assert data == event_file_bytes(Curves.from_state(restored.state()))
    (tmp_path / "events.out.tfevents.1000.airlock").write_bytes(data)
    scalars = read_scalars(tmp_path)
    assert set(scalars) == {"val/loss", "train/loss", "train/lr", "train/grad_norm"}
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 301))
    assert scalars["train/loss"][2] == (3, pytest.approx(1.0))
    assert scalars["val/loss"] == [(0, 2.5), (301, 1.5)]
    assert math.isnan(scalars["train/grad_norm"][-1][1]) and len(scalars["train/grad_norm"]) == 301
    events = read_events(tmp_path / "events.out.tfevents.1000.airlock")
    assert events[0].file_version == "brain.Event:2" and events[1].wall_time == 1000.0


def test_lm_job_writes_encrypted_curves_that_export_as_tensorboard_files(qa_dataset, tmp_path, airlock_home):
    recipe = tmp_path / "small.toml"
    recipe.write_text(SMALL_RECIPE, encoding="utf-8")
    out = cli_json("train", "lm", "--base", "tiny-deepseek-r1", "--data", "qa", "--recipe", str(recipe),
                   "--wait", "--json")
    run = out["run"]
    assert run["state"] == "succeeded", out["job"]["error"]
    metrics = run["metrics"]

    # At rest: a vault object of its own, ciphertext like every other file under AIRLOCK_HOME.
    from appliance.catalog import open_catalog
    from appliance.train.lm import lr_multiplier
    from appliance.train.recipe import recipe_from_dict

    db = open_catalog()
    kinds = dict(db.execute("SELECT object_id, kind FROM vault_deks WHERE state = 'active'").fetchall())
    assert kinds[f"curves-{run['id']}"] == "curves"
    for path in airlock_home.rglob("*"):
        if path.is_file():
            assert b"train/grad_norm" not in path.read_bytes(), path
    shown = run_cli("train", "show", run["id"])
    assert f"curves-{run['id']}" in shown.stdout and "export-curves" in shown.stdout

    # Exported on request: one TensorBoard run folder per run, read by TensorBoard's own reader.
    logdir = tmp_path / "tensorboard"
    exported = run_cli("train", "export-curves", run["id"], "--out", str(logdir))
    assert exported.returncode == 0, exported.stderr
    files = list((logdir / run["id"]).iterdir())
    assert len(files) == 1 and files[0].name.startswith("events.out.tfevents.")
    scalars = read_scalars(logdir / run["id"])
    assert set(scalars) == LM_TAGS
    for tag in ("train/loss", "train/lr", "train/grad_norm"):
        assert [s for s, _ in scalars[tag]] == list(range(1, 9)), tag
    # The same numbers the run row holds (the catalog rounds train losses to 6 digits).
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([v for _, v in metrics["train_losses"]], abs=1e-5)
    assert scalars["val/loss"] == [(0, pytest.approx(metrics["initial_val_loss"], rel=1e-6)),
                                   *[(s, pytest.approx(v, rel=1e-6)) for s, v in metrics["val_losses"]]]
    assert scalars["test/loss"] == [(8, pytest.approx(metrics["test"]["loss"], rel=1e-6))]
    recipe_used = recipe_from_dict(run["recipe"])  # the rate each step trained with (warmup, then decay)
    assert [v for _, v in scalars["train/lr"]] == pytest.approx(
        [3e-3 * lr_multiplier(step, 8, recipe_used) for step in range(8)], rel=1e-6)
    assert all(v > 0 and math.isfinite(v) for _, v in scalars["train/grad_norm"])

    # Numbers only: every event is the file header or one scalar of a known tag; no record text.
    answer = json.loads(corpus_chats(1)[0])["messages"][1]["content"].split("</think>")[-1].strip()
    raw = files[0].read_bytes()
    assert answer.encode() not in raw
    for event in read_events(files[0])[1:]:
        assert [v.tag for v in event.summary.value if v.WhichOneof("value") == "simple_value"] \
            == [v.tag for v in event.summary.value] and {v.tag for v in event.summary.value} <= LM_TAGS

    actions = [r[0] for r in db.execute("SELECT action FROM audit_log WHERE object = ? ORDER BY seq", [run["id"]])]
    assert actions[-1] == "train.export_curves"
    details = json.loads(db.execute("SELECT details FROM audit_log WHERE object = ? AND action = ?",
                                    [run["id"], "train.export_curves"]).fetchone()[0])
    assert details["out"] == str(files[0].resolve())

    # A second export into the same folder is refused in one line, and the first file is untouched.
    again = run_cli("train", "export-curves", run["id"], "--out", str(logdir))
    assert again.returncode == 2 and "never overwrites" in again.stderr and "hint: " in again.stderr
    assert files[0].read_bytes() == raw
    unknown = run_cli("train", "export-curves", "lm-nope", "--out", str(tmp_path / "elsewhere"))
    assert unknown.returncode == 2 and "no training run" in unknown.stderr
    assert not (tmp_path / "elsewhere").exists()
