"""The collector fixtures (real in-process collector, real store) for the actions tests."""

from tests.unit.collector.conftest import (
    clock,
    collector,
    no_thread_leaks,
    start_collector,
    store,
    store_path,
)

__all__ = ["clock", "collector", "no_thread_leaks", "start_collector", "store", "store_path"]
