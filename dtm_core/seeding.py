"""Named, independent random streams from one integer seed."""

from __future__ import annotations

import hashlib


def derive_seed(root_seed: int, name: str) -> int:
    """A stream's own seed: stable for (root seed, name), distinct across names, in [0, 2**31)."""
    digest = hashlib.sha256(f"{root_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
