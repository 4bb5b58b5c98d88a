"""nginx's access log (the `aiia` JSON format, services/nginx/README.md): the one parser.

Every line is one JSON object whose values are all strings. `parse_line()` keeps every
well-formed request; what a reader leaves out is its own decision on top: the monitor
drops the catch-all servers, status-less lines and its own probes (commands/monitor.py),
the load test keeps the virtual hosts it loaded (commands/loadtest.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class AccessLine:
    t: float  # epoch seconds (nginx logs whole seconds)
    vhost: str  # $server_name: "_" for the catch-all servers, "" when nginx had none
    status: int  # 0 when nginx never sent an answer (the client went away first)
    request_time_ms: float
    uri: str = ""
    upstream: bool = False  # answered by the app (False: by nginx alone: file, cache, 503)
    user_agent: str = ""

    @property
    def minute(self) -> int:
        """Epoch seconds at the start of its minute (UTC)."""
        return int(self.t // 60 * 60)


def parse_line(line: str) -> AccessLine | None:
    """One line of the log; None for a line that is not one well-formed request."""
    try:
        data = json.loads(line)
        return AccessLine(
            t=datetime.fromisoformat(data["time"]).timestamp(),
            vhost=str(data.get("vhost") or ""),
            status=int(data["status"]),
            request_time_ms=float(data["request_time"]) * 1000.0,
            uri=str(data.get("uri") or ""),
            upstream=bool(data.get("upstream_addr")),
            user_agent=str(data.get("user_agent") or ""),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def parse_lines(lines: Iterable[str]) -> Iterator[AccessLine]:
    """The well-formed requests of many lines, in order (streams: one line at a time)."""
    for raw in lines:
        parsed = parse_line(raw)
        if parsed is not None:
            yield parsed
