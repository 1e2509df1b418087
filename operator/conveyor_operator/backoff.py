"""Restart delays: the worker package's (``conveyor.backoff``), shared with ``conveyor run``."""

from conveyor.backoff import budget_left, restart_delay

__all__ = ["budget_left", "restart_delay"]
