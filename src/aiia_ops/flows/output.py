"""Output for people: aligned tables and a little colour when writing to a terminal."""

from __future__ import annotations

import os
import sys

_COLOURS = {
    "ok": "32",
    "warning": "33",
    "error": "31",
    "OK": "32",
    "WARN": "33",
    "CRIT": "31",
    "FAIL": "31",
    "healthy": "32",
    "unhealthy": "31",
    "starting": "33",
}


def use_colour(stream=None) -> bool:
    stream = stream or sys.stdout
    return hasattr(stream, "isatty") and stream.isatty() and not os.environ.get("NO_COLOR")


def paint(text: str, key: str | None = None, stream=None) -> str:
    code = _COLOURS.get(key or text)
    return f"\033[{code}m{text}\033[0m" if code and use_colour(stream) else text


def table(headers: list[str], rows: list[list[object]], stream=None) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]

    def line(values: list[str], colour: bool) -> str:
        parts = []
        for value, width in zip(values, widths, strict=False):
            pad = " " * (width - len(value))
            parts.append((paint(value, stream=stream) if colour else value) + pad)
        return "  ".join(parts).rstrip()

    out = [line(headers, False), line(["-" * w for w in widths], False)]
    out += [line(r, True) for r in cells]
    return "\n".join(out)
