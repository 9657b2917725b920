"""cloudmon agent: samples a node and pushes versioned reports to a collector.

This package must never import anything from ``cloudmon`` (the collector/desktop
distribution); the collector imports the wire schema from here instead.
"""

__version__ = "0.1.0"

#: Which implementation :mod:`cloudmon_agent.wire` binds when it is first imported:
#: ``"msgspec"``, ``"lite"`` (the standard library only, ≈3 MiB less RSS), or ``""``
#: for msgspec where it is installed.  The ``cloudmon-agent`` command sets ``"lite"``
#: before importing anything else; every other program keeps msgspec.
WIRE = ""
