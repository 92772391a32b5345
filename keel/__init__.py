"""Keel: a self-hosted AI operating layer — one governed, observed and costed path for AI traffic."""

__version__ = "0.1.0"
