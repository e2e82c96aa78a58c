"""The environment of a test's subprocess: CPU JAX with ``devices`` simulated devices, keeping any other XLA flags
of the test run (a run with ``XLA_FLAGS=--xla_cpu_max_isa=AVX2`` compiles its subprocesses the same way)."""

from __future__ import annotations

import os
import re

__all__ = ["xla_env"]


def xla_env(devices: int, **extra: str) -> dict[str, str]:
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip(), **extra)
