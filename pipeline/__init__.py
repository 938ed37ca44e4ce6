"""Async batch image generation from a YAML manifest: resumable, rate-aware, never pays twice."""

__version__ = "0.1.0"
