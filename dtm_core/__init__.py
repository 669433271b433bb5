"""Decouple-Then-Merge (DeMe) fine-tuning of diffusion models: the library.

Importable and testable on its own; it knows nothing about DVC or the
pipeline's paths. The stage scripts in ``stages/`` are the glue that calls it.
"""

__version__ = "0.1.0"
