import os

import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache per test session, shared with the subprocesses the
# training-app tests start: many tests compile the same small train step.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="lorax-xla-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(  # derandomize: the same examples on every machine and every run
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.load_profile("ci")


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture(autouse=True)
def _seeded_global_rngs():
    """Every test starts from the same global RNG states (Python, NumPy, torch), whatever ran before it in its
    worker: a draw a test forgets to seed is still the same draw on every machine and in every order."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(0)


def pytest_collection_modifyitems(session, config, items):
    """The training-app files (the longest: each runs the app many times) first: `make test` hands whole files
    to its two workers in this order, so the short files fill in at the end instead of one worker finishing a
    long file alone."""
    items.sort(key=lambda item: 0 if "/tests/train/" in str(item.path).replace("\\", "/") else 1)
