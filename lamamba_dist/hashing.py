"""File hashing shared by checkpoints, shards, sampling provenance and evaluation records."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Optional


def sha256_file(path: str | Path, chunk: int = 8 << 20) -> str:
    """Hex sha256 of a file, read in chunks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


class HashingWriter(io.RawIOBase):
    """A writable file that passes what is written to ``f`` on and hashes it on the way (sha256 in ``sha``, bytes
    in ``size``): one pass over the bytes instead of a write and a read back. The OSError of a write that failed
    is kept in ``error`` for writers that turn it into another exception (``torch.save`` does)."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0
        self.error: Optional[OSError] = None

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        try:
            n = self.f.write(b)
        except OSError as e:
            self.error = e
            raise
        self.size += len(b)
        return n
