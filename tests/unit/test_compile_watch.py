"""kiln.kernels.compile_watch: Triton's JIT hooks counted and timed, earlier hooks kept, warnings after warm-up."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from kiln.kernels.compile_watch import CompileWatch, compile_watch, variant_of


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def build(
    watch: CompileWatch,
    runtime: SimpleNamespace,
    clock: Clock,
    seconds: float,
    name: str,
    compile: object = None,
) -> object:
    """What Triton's JIT does around one variant: the before-hook, the build unless it answered, the after."""
    info = {"key": "k", "repr": name, "fn": SimpleNamespace(module="m", name=name), "compile": compile or {},
            "is_manual_warmup": False, "already_compiled": False}  # fmt: skip
    answer = runtime.jit_cache_hook(**info)
    if answer:
        return answer
    clock.now += seconds
    runtime.jit_post_compile_hook(**info)
    return answer


def test_each_variant_is_counted_with_its_seconds():
    clock, runtime = Clock(), SimpleNamespace(jit_cache_hook=None, jit_post_compile_hook=None)
    watch = CompileWatch(clock)
    watch.attach(runtime)
    build(watch, runtime, clock, 0.25, "_attention_kernel")
    build(watch, runtime, clock, 1.5, "_gemv_kernel")
    assert watch.count == 2 and watch.seconds == pytest.approx(1.75)


def test_hooks_set_before_run_first_and_their_answer_stands():
    calls: list[str] = []

    def earlier_before(**info: object) -> bool:
        calls.append(f"before {info['repr']}")
        return info["repr"] == "skipped"  # truthy: Triton does not build it

    def earlier_after(**info: object) -> None:
        calls.append(f"after {info['repr']}")

    clock = Clock()
    runtime = SimpleNamespace(jit_cache_hook=earlier_before, jit_post_compile_hook=earlier_after)
    watch = CompileWatch(clock)
    watch.attach(runtime)
    assert build(watch, runtime, clock, 0.5, "built") is False
    assert build(watch, runtime, clock, 9.0, "skipped") is True
    assert calls == ["before built", "after built", "before skipped"]
    assert watch.count == 1 and watch.seconds == pytest.approx(0.5)


def test_only_variants_built_while_serving_are_logged(caplog):
    clock, runtime = Clock(), SimpleNamespace(jit_cache_hook=None, jit_post_compile_hook=None)
    watch = CompileWatch(clock)
    watch.attach(runtime)
    with caplog.at_level(logging.WARNING, logger="kiln.kernels.compile_watch"):
        build(watch, runtime, clock, 2.0, "_warm_up_kernel")
        watch.warn_from_now()
        build(watch, runtime, clock, 1.25, "_prefill_attention")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert "_prefill_attention" in messages[0] and "1.250 s" in messages[0]
    assert "its first in this process" in messages[0]
    assert watch.count == 2


def rotary_record(positions_aligned: bool, warps: int = 4) -> dict:
    """The `compile` record Triton 3.6 hands its hooks, cut down to three arguments."""
    aligned = [["tt.divisibility", 16]]
    return {
        "signature": {"positions_ptr": "*i64", "stride": "i32", "HEADS": "constexpr"},
        "constants": {(2,): 8},
        "configs": [{(0,): aligned if positions_aligned else [], (1,): aligned}],
        "num_warps": warps,
        "num_stages": 3,
    }


def test_a_variant_built_while_serving_names_what_differs_from_the_first(caplog):
    assert variant_of(rotary_record(True)) == {
        "positions_ptr": "*i64, divisibility 16",
        "stride": "i32, divisibility 16",
        "HEADS": "constexpr = 8",
        "num_warps": "4",
        "num_stages": "3",
    }
    assert variant_of({"no": "signature"}) == {} and variant_of(None) == {}
    clock, runtime = Clock(), SimpleNamespace(jit_cache_hook=None, jit_post_compile_hook=None)
    watch = CompileWatch(clock)
    watch.attach(runtime)
    build(watch, runtime, clock, 0.5, "_rotary_kernel", rotary_record(True))
    watch.warn_from_now()
    with caplog.at_level(logging.WARNING, logger="kiln.kernels.compile_watch"):
        build(watch, runtime, clock, 0.25, "_rotary_kernel", rotary_record(False, warps=8))
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.endswith(
        "against its first variant: num_warps: 4 -> 8; positions_ptr: *i64, divisibility 16 -> *i64"
    )


def test_the_switch_turns_the_watch_off_and_refuses_other_values(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # where a watch would be attached
    for value, error in (("off", None), ("maybe", "KILN_COMPILE_WATCH='maybe'")):
        compile_watch.cache_clear()
        monkeypatch.setenv("KILN_COMPILE_WATCH", value)
        if error is None:
            assert compile_watch() is None
        else:
            with pytest.raises(ValueError, match=error):
                compile_watch()
    compile_watch.cache_clear()


def test_no_watch_where_no_triton_kernel_runs():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU machine: tests/gpu/test_compile_watch_gpu.py covers the attached watch")
    assert compile_watch() is None
