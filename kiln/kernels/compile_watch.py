"""Triton kernel variants built in this process, counted and timed.

Triton builds a kernel variant the first time a launch meets its specialisation key (constexprs, the
pointers' alignment, ...): from its disk cache in milliseconds, or compiled in seconds. In a serving
engine either happens on the step's path, so every running stream waits for it. Engines keep them out
by warming up and with the engine directory's kernels/ (kiln.kernels.kernel_cache); this watch shows
what got past both.

Rules:
- One watch per process (`compile_watch()`), through Triton's JIT hooks: `jit_cache_hook`, called
  before a variant is built, and `jit_post_compile_hook`, after. Hooks already set stay and run first;
  the before-hook's answer (truthy: do not compile) is theirs alone.
- A variant's time runs from its before-hook to its after-hook on the same thread: the disk-cache
  lookup, and the compile when that misses.
- From `warn_from_now()` (a serving loop's start, a benchmark's timed pass) each variant built is also
  logged as a warning with its kernel, its seconds, and the arguments whose specialisation differs from
  the kernel's first variant in this process (`variant_of`): what to align or warm up so that it is not
  built again. Before it (load, warm-up, graph capture) variants are only counted.
- None without Triton or a GPU (the CPU path launches no Triton kernels), and under
  KILN_COMPILE_WATCH=off (kiln.kernels.switches), which leaves Triton's hooks as they were.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from kiln.kernels.switches import env_switch

logger = logging.getLogger(__name__)

Hook = Callable[..., Any]


class CompileWatch:
    """Counts the kernel variants built (`count`) and their seconds (`seconds`) since it was attached."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.count = 0
        self.seconds = 0.0
        self._clock = clock
        self._started: dict[int, float] = {}  # thread -> when its variant's build began
        self._warn = False
        self._first: dict[str, dict[str, str]] = {}  # module.kernel -> its first variant (variant_of)
        self._before: Hook | None = None
        self._after: Hook | None = None

    def attach(self, runtime: Any) -> None:
        """Install the hooks on Triton's `knobs.runtime` (or anything with its two hook attributes)."""
        self._before, self._after = runtime.jit_cache_hook, runtime.jit_post_compile_hook
        runtime.jit_cache_hook, runtime.jit_post_compile_hook = self.before, self.after

    def warn_from_now(self) -> None:
        self._warn = True

    def before(self, **info: Any) -> Any:
        answer = self._before(**info) if self._before is not None else None
        if not answer:  # Triton builds it: the clock starts
            self._started[threading.get_ident()] = self._clock()
        return answer

    def after(self, **info: Any) -> Any:
        started = self._started.pop(threading.get_ident(), None)
        if started is not None:
            seconds = self._clock() - started
            self.count += 1
            self.seconds += seconds
            fn = info.get("fn")
            name = getattr(fn, "name", None) or "a Triton kernel"
            variant = variant_of(info.get("compile"))
            first = self._first.setdefault(f"{getattr(fn, 'module', '')}.{name}", variant)
            if self._warn:
                logger.warning(
                    "built a variant of %s after the warm-up (%.3f s; every running stream waited for it); %s",
                    name,
                    seconds,
                    _difference(first, variant) if first is not variant else "its first in this process",
                )
        return self._after(**info) if self._after is not None else None


def variant_of(compile_info: Any) -> dict[str, str]:
    """A kernel variant's specialisation by argument, from the `compile` record Triton hands its hooks:
    the argument's type, a constexpr's value, and the attributes Triton keyed it on (e.g. a pointer's
    divisibility by 16), plus num_warps and num_stages. {} for a record of another shape: the watch
    must never break a build."""
    try:
        signature = compile_info["signature"]
        constants = compile_info.get("constants") or {}
        configs = compile_info.get("configs") or [{}]
        attrs = configs[0] or {}
        variant = {}
        for index, (arg, kind) in enumerate(signature.items()):
            text = str(kind)
            if (index,) in constants:
                text += f" = {constants[(index,)]}"
            for attr, value in attrs.get((index,), ()):
                text += f", {str(attr).removeprefix('tt.')} {value}"
            variant[arg] = text
        for option in ("num_warps", "num_stages"):
            if option in compile_info:
                variant[option] = str(compile_info[option])
        return variant
    except (AttributeError, KeyError, TypeError, ValueError):
        return {}


def _difference(first: dict[str, str], variant: dict[str, str]) -> str:
    changed = [
        f"{arg}: {first.get(arg, '-')} -> {variant.get(arg, '-')}"
        for arg in sorted(first.keys() | variant.keys())
        if first.get(arg) != variant.get(arg)
    ]
    return "against its first variant: " + ("; ".join(changed) or "no argument differs")


@functools.cache
def compile_watch() -> CompileWatch | None:
    """This process's watch, attached on first use; None where no Triton kernel can run."""
    if not env_switch("KILN_COMPILE_WATCH", True) or not torch.cuda.is_available():
        return None
    try:
        from triton import knobs
    except ImportError:
        return None
    watch = CompileWatch()
    watch.attach(knobs.runtime)
    return watch
