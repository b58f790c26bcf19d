"""`KILN_*` variables Kiln does not read are named with the closest one it does (kiln.serve.environment),
and the list of what it reads is the package's own."""

from __future__ import annotations

import re
import socket
from pathlib import Path

from typer.testing import CliRunner

import kiln
import kiln.cli
from kiln.serve.environment import OTHER_VARIABLES, setting_variables, unknown_variables

# How the package reads a variable by name: os.environ.get / [...], env_switch, typer's envvar.
_READ = re.compile(r"""(?:environ\.get\(|environ\[|env_switch\(|envvar=)\s*["'](KILN_[A-Z0-9_]+)["']""")


def test_every_variable_the_package_reads_is_known() -> None:
    root = Path(kiln.__file__).parent
    read = {m for path in root.rglob("*.py") for m in _READ.findall(path.read_text())}
    assert {
        "KILN_KERNELS",
        "KILN_PDL",
        "KILN_CACHE_DIR",
        "KILN_API_KEY",
        "KILN_MODEL",
    } <= read  # the scan works
    assert read <= setting_variables() | OTHER_VARIABLES, read - setting_variables() - OTHER_VARIABLES


def test_unknown_variables_are_named_with_the_closest_known_one() -> None:
    environ = {
        "KILN_MAX_NUM_SEQZ": "4",  # a typo of a setting
        "KILN_MAX_NUM_SEQS": "4",
        "kiln_port": "8001",  # settings are read in any case
        "KILN_PDL": "0",
        "KILN_WIDENBITS": "1",  # a typo of a kernel switch
        "kiln_pdl": "0",  # the kernels' switches are read as spelled
        "KILN_FROBNICATE": "1",
        "PATH": "/bin",
    }
    assert unknown_variables(environ) == [
        ("KILN_FROBNICATE", None),
        ("KILN_MAX_NUM_SEQZ", "KILN_MAX_NUM_SEQS"),
        ("KILN_WIDENBITS", "KILN_WIDEN_BITS"),
        ("kiln_pdl", "KILN_PDL"),
    ]
    assert unknown_variables({"KILN_PORT": "1", "HOME": "/root"}) == []


def test_kiln_serve_warns_of_an_unknown_variable_before_anything_else(monkeypatch) -> None:
    monkeypatch.setenv("KILN_MAX_NUM_SEQZ", "4")
    with socket.socket() as holder:  # a busy port: serve stops at its first check, nothing loaded
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = CliRunner().invoke(
            kiln.cli.app, ["serve", "--tiny", "--host", "127.0.0.1", "--port", str(port)]
        )
    assert result.exit_code == 1
    assert (
        "KILN_MAX_NUM_SEQZ is set, but Kiln reads no variable of that name; did you mean KILN_MAX_NUM_SEQS?"
        in (" ".join(result.output.split()))
    )
