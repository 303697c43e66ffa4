"""Spec parsing and the target's platform tags (pure functions, no I/O beyond the spec file)."""

from __future__ import annotations

import pytest

from bundler.errors import BundleError
from bundler.spec import TargetSpec, load_spec
from bundler.wheels import Wheel, highest_glibc
from tests.conftest import REPO

REPO_EXAMPLE = "bundler/examples/cpu-demo.toml"


def test_platform_tags_include_every_older_manylinux_and_legacy_alias():
    tags = TargetSpec(python="3.11", platform="manylinux_2_28_x86_64").platform_tags()
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_5_x86_64" in tags
    assert {"manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert "manylinux_2_29_x86_64" not in tags
    arm = TargetSpec(python="3.11", platform="manylinux_2_28_aarch64").platform_tags()
    assert "manylinux2014_aarch64" in arm and "manylinux2010_aarch64" not in arm


def test_driver_minimum_follows_the_cuda_major():
    assert TargetSpec(python="3.11", platform="manylinux_2_28_x86_64", cuda_major=12).driver_needed == 525
    assert TargetSpec(python="3.11", platform="manylinux_2_28_x86_64", cuda_major=13).driver_needed == 580
    assert TargetSpec(python="3.11", platform="manylinux_2_28_x86_64").driver_needed == 0
    with pytest.raises(BundleError, match="cuda_major"):
        TargetSpec(python="3.11", platform="manylinux_2_28_x86_64", cuda_major=11)


def test_highest_glibc_counts_each_wheel_by_its_least_demanding_tag():
    def wheel(name: str) -> Wheel:
        return Wheel(name, "x", "1", "0" * 64, 1)

    assert highest_glibc([wheel("a-1-py3-none-any.whl"),
                          wheel("b-1-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl"),
                          wheel("c-1-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl")]) == 27
    assert highest_glibc([wheel("torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")]) == 28


def test_example_spec_loads():
    spec = load_spec(REPO / REPO_EXAMPLE)
    assert spec.product == "airlock" and spec.project is not None and spec.project.extras == ("appliance",)
    assert spec.models[0].name == "tiny-deepseek-r1" and spec.models[0].path is not None
    assert (spec.models[0].path / "model.safetensors").is_file()


def test_unknown_keys_are_refused(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text('product = "airlock"\nversion = "1"\nsequence = 1\nexpires = 2099-01-01\nsequnce = 2\n'
                    '[target]\npython = "3.11"\nplatform = "manylinux_2_28_x86_64"\n')
    with pytest.raises(BundleError, match="unknown keys"):
        load_spec(path)
