"""Per-agent parity cases of ``experiments/parity.py``: ``<agent>.run(ref, opts) -> dict`` (see common.py)."""
