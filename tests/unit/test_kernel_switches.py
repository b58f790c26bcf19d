"""The kernels' environment switches: the values each takes, and a clear error for any other."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kiln.kernels.switches import env_switch


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("ON", True), (" true ", True), ("yes", True),
                                                 ("0", False), ("off", False), ("False", False), ("no", False)])  # fmt: skip
def test_a_switch_reads_on_and_off(monkeypatch, value, expected):
    monkeypatch.setenv("KILN_TEST_SWITCH", value)
    assert env_switch("KILN_TEST_SWITCH", None) is expected


@pytest.mark.parametrize("default", [True, False, None])
def test_unset_or_empty_is_the_default(monkeypatch, default):
    monkeypatch.delenv("KILN_TEST_SWITCH", raising=False)
    assert env_switch("KILN_TEST_SWITCH", default) is default
    monkeypatch.setenv("KILN_TEST_SWITCH", "")
    assert env_switch("KILN_TEST_SWITCH", default) is default


def test_any_other_value_is_an_error_naming_the_switch(monkeypatch):
    monkeypatch.setenv("KILN_TEST_SWITCH", "fast")
    with pytest.raises(ValueError, match=r"KILN_TEST_SWITCH='fast'"):
        env_switch("KILN_TEST_SWITCH", True)


@pytest.mark.parametrize(
    ("module", "name", "value"),
    [("kiln.kernels.pdl", "KILN_PDL", "disabled"), ("kiln.kernels", "KILN_KERNELS", "refs")],
)
def test_a_mistyped_kernel_switch_stops_the_import(module, name, value):
    run = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        env={name: value, "PATH": ""},
        capture_output=True,
        text=True,
    )
    assert run.returncode != 0 and f"{name}={value!r}" in run.stderr
