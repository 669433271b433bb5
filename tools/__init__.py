"""Commands over whole runs (``python -m tools.<name>``)."""

from __future__ import annotations

import functools
import logging
import sys

from dtm_core.errors import DtmError


def command(name: str, log: bool = False):
    """A tool's ``main``: a :class:`DtmError` ends it as ``error: <name>: ...`` on stderr with exit status 2 (no
    traceback); with ``log``, INFO messages go to stderr as ``<time> <name> <message>``."""
    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            if log:
                logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(message)s", stream=sys.stderr)
            try:
                return main(*args, **kwargs)
            except DtmError as exc:
                print(f"error: {name}: {exc}", file=sys.stderr)
                return 2
        return run
    return wrap
