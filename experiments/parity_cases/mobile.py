"""MOBILE against the authors' ``agents/mobile.py`` (``MOBILEAgent``): MOPO's case
(:mod:`parity_cases.mopo`, which describes the parameters, batches, draws, metrics and defects) with
MOBILE's penalty, whose draws (per member ``J = 5`` next states ``(k, J, 16, 28)`` and next actions
``(k, J, 16, 5)``, standard normals) macfw makes at batch level (``MOBILE.penalty_noise``) and the
replay hands to the authors' ``compute_penalty`` in their order (the dynamics sample, then the
actor's)."""

from __future__ import annotations

from parity_cases.common import Options
from parity_cases.mopo import run_agent


def run(ref, opts: Options) -> dict:
    return run_agent(ref, opts, "mobile")
