"""A lean Redis reader for the one command of a cache hit: MGET, RESP written and parsed here.

A fast-path hit (aiia/fastpath.py -> courses/pagecache.peek) is one MGET of two keys. Through
Django's cache and redis-py it cost ~220 µs of CPU (docs/performance.md, "Issue 17, third
pass"): the cache proxy, key making, redis-py's command packing, its connection pool
(a lock, a health-check clock, a checkout and a release), its RESP parser. Here each thread
keeps ONE persistent socket (threading.local), writes the command as bytes and reads the
reply with the socket file's C readline/read:

    send   *N\\r\\n$4\\r\\nMGET\\r\\n$len\\r\\nkey\\r\\n ...
    reply  *N\\r\\n then $len\\r\\n<bytes>\\r\\n or $-1\\r\\n per key; -ERR ... is an error

Same server, credentials, database and timeouts as the cache's own settings (LOCATION and
OPTIONS of CACHES["default"]): socket_connect_timeout bounds the connect, socket_timeout
every send and read, as in redis-py. A new socket authenticates (AUTH [user] password) and
selects the database once. Any error closes the socket (the next call opens a new one);
an error on a socket that had already served (Redis restarted, an idle connection
dropped) is retried once on a new socket, as redis-py's pool does with a dead connection
(MGET only reads: repeating it is harmless). A timeout is not retried: a missing Redis
costs at most one connect timeout or one read timeout, as before. A forked child (gunicorn's
workers after preload_app) never uses its parent's socket.

Values are decoded by the cache's own serializer (`loads`; Django's RedisSerializer by
default), so callers get what cache.get_many would give them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

from django.core.cache.backends.redis import RedisSerializer

DJANGO_LOADS = RedisSerializer().loads  # the cache's default serializer


class RedisReplyError(Exception):
    """Redis answered an error (-ERR ...) or something that is not the expected reply."""


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def command(*parts: bytes) -> bytes:
    """One RESP command (an array of bulk strings)."""
    return b"*%d\r\n" % len(parts) + b"".join(_bulk(p) for p in parts)


class _Conn:
    __slots__ = ("file", "pid", "sock", "used")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.file = sock.makefile("rb")
        self.pid = os.getpid()
        self.used = False

    def close(self) -> None:
        for thing in (self.file, self.sock):
            with contextlib.suppress(OSError):
                thing.close()


def _line(file) -> bytes:
    line = file.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("Redis closed the connection")
    return line[:-2]


def _simple(file) -> bytes:
    line = _line(file)
    if line[:1] == b"-":
        raise RedisReplyError(line[1:].decode("utf-8", "replace"))
    return line


def _bulk_body(file, line: bytes) -> bytes | None:
    """The data after a `$<size>` line (None for nil, `$-1`)."""
    size = int(line[1:])
    if size < 0:
        return None
    data = file.read(size + 2)
    if len(data) != size + 2:
        raise ConnectionError("Redis closed the connection")
    return data[:-2]


def _bulk_reply(file) -> bytes | None:
    line = _line(file)
    kind = line[:1]
    if kind == b"$":
        return _bulk_body(file, line)
    if kind == b"-":
        raise RedisReplyError(line[1:].decode("utf-8", "replace"))
    raise RedisReplyError(f"unexpected reply {line[:40]!r}")


def _reply(file):
    """One reply of any kind a pipeline's commands give: +simple, :integer, $bulk (None
    for nil); a -error is returned as a RedisReplyError, so the replies after it are still
    read and the stream stays in step."""
    line = _line(file)
    kind = line[:1]
    if kind == b"+":
        return line[1:]
    if kind == b":":
        return int(line[1:])
    if kind == b"-":
        return RedisReplyError(line[1:].decode("utf-8", "replace"))
    if kind == b"$":
        return _bulk_body(file, line)
    raise RedisReplyError(f"unexpected reply {line[:40]!r}")


class RedisReader:
    """MGET through one socket per thread; see the module's docstring. Also the writes
    after a commit, several commands in one round trip (pipeline)."""

    def __init__(
        self,
        host: str,
        port: int = 6379,
        db: int = 0,
        *,
        username: str | None = None,
        password: str | None = None,
        connect_timeout: float | None = None,
        timeout: float | None = None,
        loads: Callable[[bytes], object] = DJANGO_LOADS,
    ):
        self.address = (host, port)
        self.loads = loads
        self.connect_timeout, self.timeout = connect_timeout, timeout
        setup = []
        if password:
            auth = (username.encode(), password.encode()) if username else (password.encode(),)
            setup.append(command(b"AUTH", *auth))
        if db:
            setup.append(command(b"SELECT", str(db).encode()))
        self._setup = setup
        self._local = threading.local()

    @classmethod
    def from_url(cls, url: str, loads=DJANGO_LOADS, **options) -> RedisReader:
        """redis://[user:password@]host[:port][/db], the cache LOCATION's form."""
        parts = urlsplit(url)
        if parts.scheme != "redis" or not parts.hostname:
            raise ValueError(f"not a plain redis:// URL: {parts.scheme}://{parts.hostname}")
        db = parts.path.strip("/")
        return cls(
            parts.hostname,
            parts.port or 6379,
            int(db) if db else 0,
            username=options.get("username") or (unquote(parts.username or "") or None),
            password=options.get("password") or (unquote(parts.password or "") or None),
            connect_timeout=options.get("socket_connect_timeout"),
            timeout=options.get("socket_timeout"),
            loads=loads,
        )

    def _connect(self) -> _Conn:
        sock = socket.create_connection(self.address, timeout=self.connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.timeout)
            conn = _Conn(sock)
            if self._setup:
                sock.sendall(b"".join(self._setup))
                for _ in self._setup:
                    _simple(conn.file)
        except BaseException:
            sock.close()
            raise
        return conn

    def _conn(self) -> _Conn:
        conn = getattr(self._local, "conn", None)
        if conn is not None and conn.pid != os.getpid():
            conn = None  # inherited over a fork: the parent's socket, never ours to use
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def close(self) -> None:
        """Close this thread's socket (the next call opens a new one)."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None and conn.pid == os.getpid():
            conn.close()

    def mget_raw(self, keys: list[bytes]) -> list[bytes | None]:
        """The stored bytes of each key (None where missing), one round trip."""
        request = command(b"MGET", *keys)
        for attempt in (1, 2):
            conn = self._conn()
            reused = conn.used
            try:
                conn.sock.sendall(request)
                head = _line(conn.file)
                if head[:1] != b"*":
                    if head[:1] == b"-":
                        raise RedisReplyError(head[1:].decode("utf-8", "replace"))
                    raise RedisReplyError(f"unexpected reply {head[:40]!r}")
                count = int(head[1:])
                if count != len(keys):
                    raise RedisReplyError(f"MGET of {len(keys)} keys answered {count}")
                values = [_bulk_reply(conn.file) for _ in range(count)]
            except RedisReplyError:
                self.close()  # the stream's position is unknown after this
                raise
            except (ConnectionError, OSError) as exc:
                self.close()
                if attempt == 1 and reused and not isinstance(exc, TimeoutError):
                    continue  # a socket that had served died meanwhile: one new socket
                raise
            except BaseException:
                self.close()
                raise
            conn.used = True
            return values
        raise AssertionError("unreachable")

    def pipeline(self, commands: list[bytes]) -> list:
        """Send the commands (each made by `command`) in one write and read their replies
        in order: one round trip. Never retried (INCRBY is not repeatable): any error but a
        Redis error reply closes the socket and is raised; the caller cannot know which
        commands ran."""
        conn = self._conn()
        try:
            conn.sock.sendall(b"".join(commands))
            replies = [_reply(conn.file) for _ in commands]
        except BaseException:
            self.close()
            raise
        conn.used = True
        return replies

    def mget(self, keys: list[bytes]) -> list:
        """As cache.get_many would decode them (the cache's serializer), None if missing."""
        return [None if v is None else self.loads(v) for v in self.mget_raw(keys)]
