"""Float comparisons relative to the reference's scale, not element by element.

Float32 results differ by CPU (SIMD widths, reduction orders, threads): an element-wise ``atol`` far below
the values compared fails on another machine for a few elements that land near the bound, while the
result is as exact as ever. ``assert_close`` bounds the largest error against the largest reference value:

    max |actual - desired| / max |desired| <= tol
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["assert_close", "assert_trees_close", "rel_error"]


def rel_error(actual: Any, desired: Any) -> float:
    """``max |actual - desired| / max |desired|`` (float64; ``inf`` where the shapes differ or a value is not
    finite where the reference's is)."""
    a, d = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    if a.shape != d.shape:
        a, d = np.broadcast_arrays(a, d)
    if not np.array_equal(np.isfinite(a), np.isfinite(d)):
        return float("inf")
    fin = np.isfinite(d)
    if not fin.any():
        return 0.0
    diff = float(np.max(np.abs(a[fin] - d[fin]), initial=0.0))
    scale = float(np.max(np.abs(d[fin]), initial=0.0))
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


def assert_close(actual: Any, desired: Any, tol: float, err_msg: str = "") -> None:
    """Assert ``max |actual - desired| / max |desired| <= tol`` (same shape; non-finite values where the
    reference has them). A reference of all zeros must be met exactly."""
    a, d = np.asarray(actual), np.asarray(desired)
    assert a.shape == d.shape or np.broadcast_shapes(a.shape, d.shape) == d.shape, \
        f"shapes differ: {a.shape} vs {d.shape} {err_msg}"
    err = rel_error(a, d)
    assert err <= tol, (f"max |actual - desired| / max |desired| = {err:.3g} > {tol:g} "
                        f"(scale {float(np.nanmax(np.abs(np.asarray(d, np.float64)), initial=0.0)):.3g}) {err_msg}")


def assert_trees_close(actual: Any, desired: Any, tol: float, err_msg: str = "") -> None:
    """Leaf by leaf, ``max |actual - desired| <= tol · (the largest |desired| of any leaf)``: gradients of a
    model compared as one vector, so that a leaf whose gradient is ~0 is held to the gradient's scale, not
    to float noise relative to itself."""
    import jax

    a, d = jax.tree.leaves(actual), jax.tree.leaves(desired)
    assert len(a) == len(d), f"{len(a)} leaves vs {len(d)} {err_msg}"
    scale = max(float(np.max(np.abs(np.asarray(x, np.float64)), initial=0.0)) for x in d)
    for i, (x, y) in enumerate(zip(a, d)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert x.shape == y.shape, f"leaf {i}: shapes {x.shape} vs {y.shape} {err_msg}"
        diff = float(np.max(np.abs(x - y), initial=0.0))
        assert diff <= tol * scale, (f"leaf {i}: max |diff| {diff:.3g} > {tol:g} x {scale:.3g} (the tree's scale) "
                                     + err_msg)
