"""Access to the compiled extension `megasail._C` (built from csrc/ by setup.py).

Import `C` from here rather than `megasail._C` directly: a missing build then fails with the
command that fixes it instead of a bare ImportError.
"""

from __future__ import annotations

BUILD_HINT = (
    "the native extension megasail._C is not built. From the repository root run\n"
    "    python setup.py build_ext --inplace\n"
    "or reinstall the package: pip install -e . --no-deps --no-build-isolation"
)

try:
    from megasail import _C as C
except ImportError as e:  # the message names the fix; the original error stays chained
    raise ImportError(BUILD_HINT) from e

__all__ = ["C", "BUILD_HINT"]
