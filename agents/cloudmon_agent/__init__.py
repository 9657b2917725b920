"""cloudmon agent: samples a node and pushes versioned reports to a collector.

This package must never import anything from ``cloudmon`` (the collector/desktop
distribution); the collector imports the wire schema from here instead.
"""

__version__ = "0.1.0"
