"""Agents: MAC, its ablations and the baselines. Importing this package registers every one of them
under the registry's ``agent`` kind (see :mod:`macfw.agents.base` for the interface)."""

from macfw.agents import (
    base,  # noqa: F401
    fmpc,  # noqa: F401
    fql,  # noqa: F401  (MAC-FQL ablation)
    fql_baseline,  # noqa: F401  (FQL baseline)
    gciql,  # noqa: F401
    leq,  # noqa: F401
    mac,  # noqa: F401
    mobile,  # noqa: F401
    mopo,  # noqa: F401
    nstep_sacbc,  # noqa: F401
    sharsa,  # noqa: F401
)
