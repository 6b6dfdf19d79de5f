"""Sizes a component needs at build time, taken from the data (never from Gin)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Spec:
    """Array sizes shared by every MAC component.

    Attributes:
      ob_dim: observation size ``s: (ob_dim,)``.
      act_dim: action size ``a: (act_dim,)`` (one environment step).
      goal_dim: goal size ``g: (goal_dim,)``; 0 for single-task (reward-based) data.
      chunk_len: action-chunk length ``n`` in environment steps.
    """

    ob_dim: int
    act_dim: int
    goal_dim: int
    chunk_len: int

    def __post_init__(self):
        for f in ("ob_dim", "act_dim", "chunk_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"Spec.{f} must be a positive int, got {v!r}.")
        if not isinstance(self.goal_dim, int) or self.goal_dim < 0:
            raise ValueError(f"Spec.goal_dim must be an int >= 0, got {self.goal_dim!r}.")

    @property
    def chunk_dim(self) -> int:
        """Size of a flattened action chunk ``A: (chunk_len * act_dim,)``."""
        return self.chunk_len * self.act_dim

    @property
    def goal_conditioned(self) -> bool:
        return self.goal_dim > 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
