"""The kernels' environment switches (KILN_PDL, KILN_WIDEN_BITS, KILN_FP8_FAST_ACCUM, KILN_ENGINE_KERNELS,
KILN_COMPILE_WATCH).

The kernel switches are read once, where their modules are imported; KILN_ENGINE_KERNELS at each engine
load; KILN_COMPILE_WATCH when the process first asks for its watch. A switch is on for 1/on/true/yes and
off for 0/off/false/no (any case); unset or empty leaves the default. Any other value is an error naming
the switch, so a mistyped switch cannot pass for the default in a comparison.
"""

from __future__ import annotations

import os

_ON = frozenset({"1", "on", "true", "yes"})
_OFF = frozenset({"0", "off", "false", "no"})


def env_switch(name: str, default: bool | None) -> bool | None:
    """The switch `name` from the environment: True (on), False (off), or `default` when unset or empty."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise ValueError(f"{name}={os.environ[name]!r}: expected 1/on/true/yes or 0/off/false/no")
