"""Client errors (4xx) must not flood the log.

Django logs every 4xx answer at WARNING (`django.request`; `django.security.*` for a
refused CSRF check, at ERROR for a disallowed Host), so a scanner probing paths writes
one line per probe. This filter, on the stdout handler, turns those records into INFO and lets
at most CLIENT_ERROR_BURST of them through per CLIENT_ERROR_WINDOW seconds per process;
the first line after a window that dropped some says how many were dropped. Server errors
(5xx, ERROR) and every other record pass untouched. nginx's access log still has every
request.
"""

from __future__ import annotations

import logging
import threading
import time

CLIENT_ERROR_BURST = 10
CLIENT_ERROR_WINDOW = 60.0


def _is_client_error(record: logging.LogRecord) -> bool:
    # django.request: a 4xx answer (WARNING). django.security.*: a refused CSRF check
    # (WARNING, 403) or a suspicious request such as a disallowed Host (ERROR, 400).
    if record.levelno not in (logging.WARNING, logging.ERROR):
        return False
    if not (record.name == "django.request" or record.name.startswith("django.security.")):
        return False
    status = getattr(record, "status_code", None)
    return isinstance(status, int) and 400 <= status < 500


class ClientErrorFilter(logging.Filter):
    def __init__(
        self, burst: int = CLIENT_ERROR_BURST, window: float = CLIENT_ERROR_WINDOW, clock=None
    ):
        super().__init__()
        self.burst = burst
        self.window = window
        self.clock = clock or time.monotonic
        self._lock = threading.Lock()
        self._start = None
        self._passed = 0
        self._dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not _is_client_error(record):
            return True
        if logging.getLogger(record.name).getEffectiveLevel() > logging.INFO:
            return False  # demoted below the level this logger was asked to emit
        with self._lock:
            now = self.clock()
            if self._start is None or now - self._start >= self.window:
                dropped, self._dropped = self._dropped, 0
                self._start, self._passed = now, 0
                if dropped:
                    message = record.getMessage()
                    record.msg = f"%s [{dropped} more client errors not logged before this one]"
                    record.args = (message,)
            if self._passed >= self.burst:
                self._dropped += 1
                return False
            self._passed += 1
        record.levelno, record.levelname = logging.INFO, "INFO"
        # A client's mistake needs no traceback (Django attaches one to a DisallowedHost).
        record.exc_info, record.exc_text = None, None
        return True
