"""cloudmon: collector, telemetry stores, cluster model and desktop console.

Only ``cloudmon.ui`` imports Qt; everything else runs headless.
"""

__version__ = "0.1.0"
