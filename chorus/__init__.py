"""chorus: real-time streaming speech inference."""

__version__ = "0.1.0"
