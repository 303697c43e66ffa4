"""Nothing in the appliance's main paths touches the network."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, needs_loopback, needs_unshare, run_cli

# Runs the real `airlock` CLI in-process with the audit hook that refuses any non-loopback
# connect or DNS lookup, so an attempt fails loudly even on a machine that has a network.
GUARDED_CLI = """
import sys
from appliance.offline import forbid_network
forbid_network()
from appliance.cli import main
sys.argv = ["airlock", *sys.argv[1:]]
main()
"""


def test_importing_appliance_forces_offline_environment():
    code = "import os, appliance; print(os.environ['HF_HUB_OFFLINE'], os.environ['TRANSFORMERS_OFFLINE'])"
    env = {**os.environ, "HF_HUB_OFFLINE": "0"}  # a stray site export must not win
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["1", "1"]


def test_audit_hook_refuses_outbound_connect_and_dns():
    code = """
import socket
from appliance.offline import forbid_network, NetworkForbiddenError
forbid_network()
for target in [("203.0.113.7", 443), ("2001:db8::1", 443)]:
    family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
    try:
        socket.socket(family).connect(target)
    except NetworkForbiddenError:
        print("refused", target[0])
try:
    socket.getaddrinfo("huggingface.co", 443)
except NetworkForbiddenError:
    print("refused dns")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.splitlines() == ["refused 203.0.113.7", "refused 2001:db8::1", "refused dns"]


@needs_loopback
def test_audit_hook_allows_loopback():
    code = """
import socket
from appliance.offline import forbid_network
forbid_network()
server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen()
socket.create_connection(server.getsockname(), timeout=2).close()
socket.getaddrinfo("localhost", 80)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("args", [["doctor", "--json"], ["audit", "verify"], ["base-models", "list", "--json"],
                                  ["demo", "--help"]])
def test_main_paths_run_with_network_refused(args):
    result = subprocess.run([sys.executable, "-c", GUARDED_CLI, *args], capture_output=True, text=True,
                            cwd=REPO, timeout=300, check=False)
    assert "network access refused" not in result.stderr
    assert result.returncode == 0, result.stderr


@needs_unshare
def test_main_paths_run_without_a_network_namespace():
    doctor = run_cli("doctor", "--json", wrap=["unshare", "-n"])
    assert doctor.returncode == 0, doctor.stderr
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert checks["network"]["status"] == "ok" and "isolated" in checks["network"]["detail"]
