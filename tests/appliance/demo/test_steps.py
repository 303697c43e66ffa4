"""The demo's plumbing: a failing stage names its command and shows what it printed; inside
`unshare -n` the demo brings the loopback interface up and nothing else exists."""

from __future__ import annotations

import subprocess
import sys

import pytest

from appliance.demo.steps import Cli, DemoError, Report, Stage
from tests.conftest import BIN, REPO, needs_unshare


def test_a_failing_command_raises_with_its_own_error(airlock_home):
    cli = Cli(BIN / "airlock", env={"AIRLOCK_HOME": str(airlock_home)})
    with pytest.raises(DemoError) as caught:
        cli.json("data", "show", "no-such-dataset")
    message = str(caught.value)
    assert message.startswith("`airlock data show no-such-dataset --json` exited 2:")
    assert "no-such-dataset" in message.split("\n", 1)[1]  # the command's own error line, indented
    assert "--keep" in caught.value.hint


def test_a_failed_stage_is_a_failed_row(capsys):
    report = Report()
    with pytest.raises(RuntimeError), Stage(report, "train", "4. train"):
        raise RuntimeError("boom")
    with Stage(report, "audit", "6. audit") as stage:
        stage.metric = "chain intact"
    assert [(s.stage, s.ok, s.metric) for s in report.stages] == [("train", False, "FAILED"),
                                                                  ("audit", True, "chain intact")]
    assert Report.from_dict(report.to_dict()) == report
    assert "== 4. train" in capsys.readouterr().out


@needs_unshare
def test_loopback_comes_up_inside_a_new_network_namespace():
    code = ("from appliance.demo.netns import ensure_loopback, loopback_works\n"
            "import socket\n"
            "print(loopback_works())\n"
            "ensure_loopback()\n"
            "print(loopback_works())\n"
            "print(sorted(name for _, name in socket.if_nameindex()))\n")
    out = subprocess.run(["unshare", "-n", sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         check=True, timeout=60)
    assert out.stdout.split("\n")[:3] == ["False", "True", "['lo']"]
