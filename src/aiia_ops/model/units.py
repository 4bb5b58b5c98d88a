"""Sizes and durations as the stack file writes them ("64MB", "30s"), parsed once.

Sizes are binary (1 MB = 1024 KB), as Docker and the daemons count them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SIZE_UNITS = {
    "b": 1,
    "": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
}
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_NUMBER = r"(\d+(?:\.\d+)?)"


class UnitError(ValueError):
    """The text is not a size or duration; the message says what is expected."""


def _trim(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


@dataclass(frozen=True, order=True)
class Size:
    bytes: int

    @classmethod
    def parse(cls, text: object) -> Size:
        if isinstance(text, Size):
            return text
        if isinstance(text, bool) or not isinstance(text, (str, int)):
            raise UnitError(f"expected a size such as 64MB, got {text!r}")
        match = re.fullmatch(_NUMBER + r"\s*([A-Za-z]*)", str(text).strip())
        unit = match and match.group(2).lower()
        if not match or unit not in _SIZE_UNITS:
            raise UnitError(f"expected a size such as 64MB (units B, KB, MB, GB), got {text!r}")
        return cls(round(float(match.group(1)) * _SIZE_UNITS[unit]))

    @classmethod
    def mb_(cls, n: float) -> Size:
        return cls(round(n * 1024**2))

    @property
    def kb(self) -> int | float:
        return _trim(self.bytes / 1024)

    @property
    def mb(self) -> int | float:
        return _trim(round(self.bytes / 1024**2, 3))

    def __add__(self, other: Size) -> Size:
        return Size(self.bytes + other.bytes)

    def __sub__(self, other: Size) -> Size:
        return Size(self.bytes - other.bytes)

    def __mul__(self, n: float) -> Size:
        return Size(round(self.bytes * n))

    __rmul__ = __mul__

    def __str__(self) -> str:
        for unit, factor in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
            if self.bytes >= factor and (self.bytes * 10) % factor == 0:
                return f"{_trim(self.bytes / factor)}{unit}"
        return f"{self.bytes}B"


@dataclass(frozen=True, order=True)
class Duration:
    seconds: float

    @classmethod
    def parse(cls, text: object) -> Duration:
        if isinstance(text, Duration):
            return text
        match = isinstance(text, str) and re.fullmatch(_NUMBER + r"\s*(ms|s|m|h|d)", text.strip())
        if not match:
            raise UnitError(f"expected a duration such as 30s (units ms, s, m, h, d), got {text!r}")
        return cls(float(match.group(1)) * _DURATION_UNITS[match.group(2)])

    @property
    def ms(self) -> int | float:
        return _trim(round(self.seconds * 1000, 3))

    @property
    def whole_seconds(self) -> int:
        return round(self.seconds)

    def __str__(self) -> str:
        for unit in ("d", "h", "m", "s"):
            factor = _DURATION_UNITS[unit]
            if self.seconds >= factor and self.seconds % factor == 0:
                return f"{int(self.seconds // factor)}{unit}"
        return f"{self.ms}ms"
