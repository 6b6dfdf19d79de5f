"""Hindsight goal relabelling as configuration (DESIGN §2.1; issue 28).

:class:`GoalSampling` holds the eight relabelling settings of the authors' agents (``get_config`` of
every agent in seohongpark/horizon-reduction and kwanyoungpark/MAC, which are OGBench's names too).
One run trains one agent, so the Gin bindings ``GoalSampling.<field> = ...`` are that agent's: every
agent builds its :class:`GoalSampling` when it is constructed (its ``goal_sampling`` argument, None:
``GoalSampling()`` with the bindings in force) and hands it to the sampler in its
:class:`~macfw.agents.base.BatchSpec`. Only goal-conditioned batches read it.
"""

from __future__ import annotations

import dataclasses

from macfw.errors import check, check_float
from macfw.registry import register

_TOL = 1e-6


@dataclasses.dataclass(frozen=True)
class GoalSampling:
    """How the value goal and the actor goal of a goal-conditioned sample are drawn.

    Each sample at chunk start ``t`` (trajectory final index ``end``) gets two goal indices, each
    drawn independently as: the current state ``t`` (probability ``*_p_curgoal``); a later state of
    the same trajectory (``*_p_trajgoal``); or a state drawn uniformly from the whole dataset
    (``*_p_randomgoal``; under shard rotation, from the shard in use). A later state is at offset
    ``Geom(1 - gamma) >= 1`` environment steps clipped to ``end`` (``min(t + Geom(1 - gamma), end)``;
    ``end`` when ``gamma = 1``) when ``*_geom_sample``, else uniform over ``t + 1 .. end``.
    ``gamma`` is the agent's discount (its :class:`~macfw.agents.base.BatchSpec`).

    The defaults are those of every agent's ``get_config`` in the authors' code (DESIGN §2.1), and
    macfw's draws with them are bit for bit the draws of macfw before this was configurable. The
    authors' run commands change them per environment, e.g. cube-octuple
    ``actor_p_trajgoal = 1.0, actor_p_randomgoal = 0.0, actor_geom_sample = True`` and
    humanoidmaze-giant ``actor_p_trajgoal = 1.0, actor_p_randomgoal = 0.0, actor_geom_sample = False``.

    Attributes (probabilities are unitless, in [0, 1]; the three of the value goal sum to 1, and so
    do the three of the actor goal):
      value_p_curgoal: value goal = the current state ``t`` (0.2). Such a sample succeeds at once
        (``success = 1``).
      value_p_trajgoal: value goal = a later state of the same trajectory (0.5).
      value_p_randomgoal: value goal = a random dataset state (0.3).
      value_geom_sample: the value goal's later state at a geometric offset (True) or uniform
        over the rest of the trajectory (False, the default).
      actor_p_curgoal: actor goal = the current state (0.0).
      actor_p_trajgoal: actor goal = a later state of the same trajectory (0.5).
      actor_p_randomgoal: actor goal = a random dataset state (0.5).
      actor_geom_sample: the actor goal's later state at a geometric offset (True, the default) or
        uniform over the rest of the trajectory (False).

    Raises:
      ConfigError (a ValueError): a probability that is not a number in [0, 1], a ``*_geom_sample``
        that is not True or False, or three probabilities of one goal whose sum is not 1 (within
        1e-6); the message names the binding (e.g. ``GoalSampling.actor_p_randomgoal``), the value
        received and the value that would fix it.
    """

    value_p_curgoal: float = 0.2
    value_p_trajgoal: float = 0.5
    value_p_randomgoal: float = 0.3
    value_geom_sample: bool = False
    actor_p_curgoal: float = 0.0
    actor_p_trajgoal: float = 0.5
    actor_p_randomgoal: float = 0.5
    actor_geom_sample: bool = True

    def __post_init__(self):
        for who in ("value", "actor"):
            names = (f"{who}_p_curgoal", f"{who}_p_trajgoal", f"{who}_p_randomgoal")
            p = [check_float(f"GoalSampling.{f}", getattr(self, f), low=0.0, high=1.0) for f in names]
            for f, v in zip(names, p):
                object.__setattr__(self, f, v)
            flag = f"{who}_geom_sample"
            value = getattr(self, flag)
            check(f"GoalSampling.{flag}", value, isinstance(value, bool), "True or False")
            total = sum(p)
            if abs(total - 1.0) > _TOL:
                rest = 1.0 - p[0] - p[1]
                if rest >= -_TOL:  # the usual slip: p_trajgoal changed, p_randomgoal left at its default
                    check(
                        f"GoalSampling.{names[2]}",
                        p[2],
                        False,
                        f"{rest:.6g} = 1 - GoalSampling.{names[0]} - GoalSampling.{names[1]}: the {who} goal's "
                        f"three probabilities must sum to 1, they sum to {total:.6g}",
                    )
                check(
                    f"GoalSampling.{names[1]}",
                    p[1],
                    False,
                    f"at most {1.0 - p[0]:.6g} = 1 - GoalSampling.{names[0]}: the {who} goal's three "
                    f"probabilities must sum to 1, they sum to {total:.6g}",
                )

    def probabilities(self, who: str) -> tuple[float, float, float]:
        """``(p_curgoal, p_trajgoal, p_randomgoal)`` of ``who`` (``'value'`` or ``'actor'``)."""
        return (
            getattr(self, f"{who}_p_curgoal"),
            getattr(self, f"{who}_p_trajgoal"),
            getattr(self, f"{who}_p_randomgoal"),
        )


#: The defaults (DESIGN §2.1): what a :class:`~macfw.agents.base.BatchSpec` holds unless told otherwise.
#: Built before the class is made Gin-configurable, so no binding can ever change it.
DEFAULT_GOALS = GoalSampling()

# Registered (and made a Gin configurable, in place: the same class) only now, after DEFAULT_GOALS.
GoalSampling = register("goals")(GoalSampling)


def goal_sampling_for(agent_name: str, goal_sampling) -> GoalSampling:
    """An agent's goal sampling: ``goal_sampling``, or ``GoalSampling()`` (the Gin bindings
    ``GoalSampling.*`` in force now) when it is None.

    Raises:
      ConfigError: ``goal_sampling`` is neither None nor a :class:`GoalSampling` (names
        ``<agent_name>.goal_sampling``).
    """
    if goal_sampling is None:
        return GoalSampling()
    check(
        f"{agent_name}.goal_sampling", goal_sampling, isinstance(goal_sampling, GoalSampling), "None or @GoalSampling()"
    )
    return goal_sampling
