"""Session-wide test settings.

Set before JAX is imported: one dataset cache for the whole session, shared by pytest-xdist's
workers (tiny datasets are generated once; concurrent writers are safe, see
``generate._save_atomic``), and JAX's persistent compilation cache, shared with the ``python -m
macfw.run`` subprocesses the end-to-end tests start, so identical programs compile once per session.
"""

import os
import tempfile


def _session_cache() -> str:
    """One folder per test session; under pytest-xdist (``-n 2``) every worker of the run gets the same
    one (named by the run's id), so the workers share generated datasets and compiled programs."""
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run_id is None:
        return tempfile.mkdtemp(prefix="macfw-test-cache-")
    path = os.path.join(tempfile.gettempdir(), f"macfw-test-cache-{run_id}")
    os.makedirs(path, exist_ok=True)
    return path


_CACHE = os.environ.setdefault("MACFW_CACHE_DIR", _session_cache())
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_CACHE, "jax-compile"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# Tiny networks: compilation dominates test time; cheaper XLA CPU compilation cuts it by ~30%.
# (Subprocesses inherit it; tests that set their own XLA_FLAGS replace it.)
# A user's own XLA_FLAGS (e.g. --xla_cpu_max_isa=AVX2, as CI's second pass) are kept and these added.
_FAST = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
_flags = os.environ.get("XLA_FLAGS", "").split()
os.environ["XLA_FLAGS"] = " ".join(
    _flags + [f for f in _FAST if f.split("=")[0] not in {x.split("=")[0] for x in _flags}]
)


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_gin_bindings_left_behind():
    """Clear Gin's config after every test: code that parses bindings in-process (``macfw.bench``'s
    set-up, ``macfw.run.parse_gin``) must not change what later tests build."""
    yield
    import gin

    gin.clear_config()
