"""Decouple-Then-Merge (DeMe) fine-tuning of diffusion models: the library.

Importable and testable on its own; it knows nothing about DVC. The stage
scripts in ``stages/`` call :mod:`dtm_core.steps`, one module per stage.
"""

__version__ = "0.1.0"
