"""Orchestration: the only layer that imports Ray (Tune trials, Train jobs, experiments)."""
