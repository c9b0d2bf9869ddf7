"""How every benchmark reports: its result as JSON on stdout and, with ``--out``, in that file."""

from __future__ import annotations

import json
from pathlib import Path


def report(result: dict, out: str | None, indent: int = 2) -> None:
    """Print ``result`` as JSON; write the same text to ``out`` (its folder made) when given."""
    text = json.dumps(result, indent=indent)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
