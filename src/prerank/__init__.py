"""prerank: pre-ranking models for cascade ranking systems."""

__version__ = "0.1.0"
