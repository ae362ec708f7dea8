"""Which vLLM releases the plugin is tested with, and what it says about the running one."""

from __future__ import annotations

import re

TESTED_MINORS = ((0, 32), (0, 33))  # CI runs 0.32 (the CPU build); 0.33's scheduler is driven in tests
UNSUPPORTED_BELOW = (0, 32)  # the engine glue relies on 0.32's V1 runner, scheduler and hooks


def vllm_version() -> str:
    import vllm

    return vllm.__version__


def minor_of(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"cannot read a vLLM version from {version!r}")
    return int(match.group(1)), int(match.group(2))


def version_status(version: str) -> str:
    """``"tested"``, ``"untested"`` (newer than the tested range) or ``"unsupported"`` (older)."""
    minor = minor_of(version)
    if minor < UNSUPPORTED_BELOW:
        return "unsupported"
    return "tested" if minor in TESTED_MINORS else "untested"


def tested_range() -> str:
    return ", ".join(f"{a}.{b}" for a, b in TESTED_MINORS)
