"""aiia/redisread.py against a small RESP server in a thread: the replies, the errors, the
reconnects, and courses/pagecache.peek reading Django's own stored values through it."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import time

from django.core.cache.backends.redis import RedisSerializer
from django.test import SimpleTestCase, override_settings

from .redisread import RedisReader, RedisReplyError, command


def _read_command(file) -> list[bytes] | None:
    head = file.readline()
    if not head:
        return None
    assert head[:1] == b"*", head
    parts = []
    for _ in range(int(head[1:])):
        size = int(file.readline()[1:])
        parts.append(file.read(size + 2)[:-2])
    return parts


class FakeRedis(socketserver.ThreadingTCPServer):
    """AUTH, SELECT and MGET over real sockets; records what each connection sent."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, user=None, password=None):
        self.data: dict[bytes, bytes] = {}
        self.user, self.password = user, password
        self.connections = 0
        self.commands: list[list[bytes]] = []
        self.open: list[socket.socket] = []
        self.reply_error: bytes | None = None
        self.delay = 0.0
        super().__init__(("127.0.0.1", 0), FakeHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def drop_all(self) -> None:
        """As a Redis restart does to its clients' sockets."""
        for sock in self.open:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.open.clear()

    def stop(self) -> None:
        self.drop_all()
        self.shutdown()
        self.server_close()


class FakeHandler(socketserver.StreamRequestHandler):
    def handle(self):
        server: FakeRedis = self.server
        server.connections += 1
        server.open.append(self.request)
        authed = server.password is None
        while (parts := _read_command(self.rfile)) is not None:
            server.commands.append(parts)
            name = parts[0].upper()
            if name == b"AUTH":
                authed = parts[1:] == [p.encode() for p in (server.user, server.password) if p]
                self.wfile.write(b"+OK\r\n" if authed else b"-WRONGPASS invalid password\r\n")
            elif not authed:
                self.wfile.write(b"-NOAUTH Authentication required.\r\n")
            elif name == b"SELECT":
                self.wfile.write(b"+OK\r\n")
            elif name == b"MGET":
                time.sleep(server.delay)
                if server.reply_error:
                    self.wfile.write(b"-" + server.reply_error + b"\r\n")
                    continue
                out = [b"*%d\r\n" % (len(parts) - 1)]
                for key in parts[1:]:
                    value = server.data.get(key)
                    out.append(
                        b"$-1\r\n" if value is None else b"$%d\r\n%s\r\n" % (len(value), value)
                    )
                self.wfile.write(b"".join(out))
            else:
                self.wfile.write(b"-ERR unknown command\r\n")


class RedisReaderTests(SimpleTestCase):
    def setUp(self):
        self.server = FakeRedis(user="app", password="s3cret")
        self.addCleanup(self.server.stop)
        self.reader = RedisReader(
            "127.0.0.1", self.server.port, 3, username="app", password="s3cret",
            connect_timeout=1, timeout=0.5,
        )  # fmt: skip
        self.addCleanup(self.reader.close)

    def test_command_is_resp(self):
        self.assertEqual(
            command(b"MGET", b"a", b"bc"), b"*3\r\n$4\r\nMGET\r\n$1\r\na\r\n$2\r\nbc\r\n"
        )

    def test_values_missing_keys_and_djangos_encoding(self):
        dumps = RedisSerializer().dumps
        self.server.data[b"t"] = dumps("tok")
        self.server.data[b"e"] = dumps(("tok", 1.5, b"\r\n{}\x00" * 3000))
        self.server.data[b"n"] = b"42"  # Django stores ints as digits
        self.assertEqual(
            self.reader.mget([b"t", b"nope", b"e", b"n"]),
            ["tok", None, ("tok", 1.5, b"\r\n{}\x00" * 3000), 42],
        )

    def test_one_socket_per_thread_authenticated_and_selected_once(self):
        for _ in range(3):
            self.reader.mget([b"x"])
        self.assertEqual(self.server.connections, 1)
        self.assertEqual(
            self.server.commands[:2], [[b"AUTH", b"app", b"s3cret"], [b"SELECT", b"3"]]
        )
        other = threading.Thread(target=lambda: (self.reader.mget([b"x"]), self.reader.close()))
        other.start()
        other.join()
        self.assertEqual(self.server.connections, 2)

    def test_a_dropped_socket_is_replaced_once(self):
        self.server.data[b"k"] = b"7"
        self.assertEqual(self.reader.mget([b"k"]), [7])
        self.server.drop_all()  # Redis restarted: the kept socket is dead
        self.assertEqual(self.reader.mget([b"k"]), [7])
        self.assertEqual(self.server.connections, 2)

    def test_nothing_listening_is_an_error_not_a_retry_loop(self):
        port = self.server.port
        self.server.stop()
        reader = RedisReader("127.0.0.1", port, connect_timeout=1, timeout=0.5)
        with self.assertRaises(ConnectionError):
            reader.mget([b"k"])

    def test_a_slow_reply_times_out_once(self):
        self.reader.mget([b"k"])
        self.server.delay = 1.0
        started = time.monotonic()
        with self.assertRaises(TimeoutError):
            self.reader.mget([b"k"])
        self.assertLess(time.monotonic() - started, 0.9)  # one timeout (0.5 s), no retry
        self.server.delay = 0
        time.sleep(0.6)  # the fake's handler finishes the late reply to the closed socket
        self.assertEqual(self.reader.mget([b"k"]), [None])  # a new socket

    def test_redis_errors_raise_and_the_socket_is_renewed(self):
        self.reader.mget([b"k"])
        self.server.reply_error = b"OOM command not allowed"
        with self.assertRaisesRegex(RedisReplyError, "OOM"):
            self.reader.mget([b"k"])
        self.server.reply_error = None
        self.assertEqual(self.reader.mget([b"k"]), [None])
        self.assertEqual(self.server.connections, 2)

    def test_wrong_password_is_an_error(self):
        reader = RedisReader("127.0.0.1", self.server.port, username="app", password="nope")
        with self.assertRaisesRegex(RedisReplyError, "WRONGPASS"):
            reader.mget([b"k"])

    def test_from_url_takes_the_cache_options(self):
        reader = RedisReader.from_url(
            "redis://10.0.0.7:6380/2", username="u", password="p",
            socket_connect_timeout=2, socket_timeout=3,
        )  # fmt: skip
        self.assertEqual(
            (reader.address, reader.connect_timeout, reader.timeout), (("10.0.0.7", 6380), 2, 3)
        )
        self.assertEqual(reader._setup, [command(b"AUTH", b"u", b"p"), command(b"SELECT", b"2")])
        with self.assertRaises(ValueError):
            RedisReader.from_url("unix:///run/redis.sock")

    def test_pagecache_peek_reads_djangos_stored_entries_through_it(self):
        from courses import pagecache

        from aiia import cache as aiia_cache

        caches = {
            "default": {
                "BACKEND": "aiia.cache.RedisCache",
                "LOCATION": f"redis://127.0.0.1:{self.server.port}/3",
                "KEY_PREFIX": "aiia:test",
                "OPTIONS": {"username": "app", "password": "s3cret", "socket_timeout": 1},
            }
        }
        dumps = RedisSerializer().dumps
        with override_settings(CACHES=caches):
            from django.core.cache import caches as django_caches

            reader, make_key = aiia_cache.lean_reader()
            self.assertIsNotNone(reader)
            self.addCleanup(reader.close)
            self.assertIs(django_caches["default"].__class__, aiia_cache.RedisCache)
            version, entry = b"aiia:test:1:v", b"aiia:test:1:k:entry:1"
            self.assertEqual(make_key(pagecache.entry_key("k", "1")).encode(), entry)
            self.server.data[version] = dumps("tok")
            self.server.data[entry] = dumps(("tok", time.time(), b"[1]"))
            self.assertEqual(pagecache.peek("k", "v", "1"), b"[1]")
            self.server.data[version] = dumps("newer")  # a write: the entry is stale
            self.assertIsNone(pagecache.peek("k", "v", "1"))
        self.assertEqual(aiia_cache.lean_reader(), (None, None))  # local memory again
