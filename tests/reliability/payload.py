"""A real malicious pickle: unpickling a Payload runs code, which creates a marker file."""
from __future__ import annotations

from pathlib import Path


class Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)
