"""The benchmarks' engine flags are generated from EngineConfig: one flag per knob, its default and help."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from kiln.bench import cli as bench_cli
from kiln.bench.workload import add_engine_arguments, engine_config
from kiln.config import EngineConfig

KNOBS = dataclasses.fields(EngineConfig)


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.dest: action for action in parser._actions}


@pytest.mark.parametrize("knob", KNOBS, ids=[f.name for f in KNOBS])
def test_every_engine_knob_is_a_bench_flag_with_its_default_and_help(knob: dataclasses.Field) -> None:
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    action = _actions(parser)[knob.name]
    assert f"--{knob.name.replace('_', '-')}" in action.option_strings
    assert action.default == knob.default
    assert action.help is not None and action.help.replace("%%", "%").startswith(knob.metadata["help"])
    assert " ".join(knob.metadata["help"].split()) in " ".join(parser.format_help().split())
    assert engine_config(parser.parse_args([])) == EngineConfig()


def test_flags_reach_the_engine_config_and_ranges_are_checked() -> None:
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    args = parser.parse_args(["--max-num-seqs", "3", "--no-enable-prefix-caching", "--dtype", "fp16"])
    assert engine_config(args, seed=4) == EngineConfig(
        max_num_seqs=3, enable_prefix_caching=False, dtype="fp16", seed=4
    )
    with pytest.raises(ValueError, match="admission_interval must be >= 1"):
        engine_config(parser.parse_args(["--admission-interval", "0"]))


def test_kiln_bench_takes_every_knob_but_engine_process() -> None:
    dests = set(_actions(bench_cli._parser()))
    assert {f.name for f in KNOBS} - dests == {"engine_process"}
    bench_cli._parser().format_help()  # argparse expands every help's %-formatting here
