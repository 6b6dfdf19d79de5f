"""Agents: MAC, its ablations and the baselines. Importing this package registers every one of them
under the registry's ``agent`` kind (see :mod:`macfw.agents.base` for the interface)."""

from macfw.agents import base  # noqa: F401
from macfw.agents import mac  # noqa: F401
from macfw.agents import fql  # noqa: F401  (MAC-FQL ablation)
from macfw.agents import mopo  # noqa: F401
from macfw.agents import mobile  # noqa: F401
from macfw.agents import fql_baseline  # noqa: F401  (FQL baseline)
from macfw.agents import nstep_sacbc  # noqa: F401
from macfw.agents import gciql  # noqa: F401
from macfw.agents import sharsa  # noqa: F401
from macfw.agents import fmpc  # noqa: F401
from macfw.agents import leq  # noqa: F401
