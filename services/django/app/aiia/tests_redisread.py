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
            elif name == b"GET":
                value = server.data.get(parts[1])
                self.wfile.write(
                    b"$-1\r\n" if value is None else b"$%d\r\n%s\r\n" % (len(value), value)
                )
            elif name == b"EXISTS":
                self.wfile.write(b":%d\r\n" % (parts[1] in server.data))
            elif name == b"INCRBY":
                try:
                    value = int(server.data.get(parts[1], b"0")) + int(parts[2])
                except ValueError:
                    self.wfile.write(b"-ERR value is not an integer or out of range\r\n")
                    continue
                server.data[parts[1]] = b"%d" % value
                self.wfile.write(b":%d\r\n" % value)
            elif name == b"SET":
                server.data[parts[1]] = parts[2]
                self.wfile.write(b"+OK\r\n")
            elif name == b"DEL":
                self.wfile.write(b":%d\r\n" % (server.data.pop(parts[1], None) is not None))
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

    def caches_on_the_fake(self) -> dict:
        """CACHES for aiia.cache.RedisCache on this test's fake server."""
        return {
            "default": {
                "BACKEND": "aiia.cache.RedisCache",
                "LOCATION": f"redis://127.0.0.1:{self.server.port}/3",
                "KEY_PREFIX": "aiia:test",
                "OPTIONS": {"username": "app", "password": "s3cret", "socket_timeout": 1},
            }
        }

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

    def test_a_pipeline_is_one_write_and_its_replies_in_order(self):
        self.server.data[b"n"] = b"41"
        self.server.data[b"text"] = b"abc"
        replies = self.reader.pipeline(
            [
                command(b"INCRBY", b"n", b"1"),
                command(b"INCRBY", b"text", b"1"),  # an error reply in the middle
                command(b"SET", b"t", b"x"),
                command(b"DEL", b"t"),
                command(b"EXISTS", b"t"),
            ]
        )
        self.assertEqual(replies[0], 42)
        self.assertIsInstance(replies[1], RedisReplyError)
        self.assertEqual(replies[2:], [b"OK", 1, 0])
        self.assertEqual(self.reader.mget([b"n"]), [42])  # the stream stayed in step
        self.assertEqual(self.server.connections, 1)

    def test_a_pipeline_is_never_retried(self):
        self.reader.mget([b"k"])
        self.server.drop_all()
        with self.assertRaises((ConnectionError, OSError)):
            self.reader.pipeline([command(b"INCRBY", b"n", b"1")])
        self.assertNotIn(b"n", self.server.data)  # sent on the dead socket only, not again

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

        caches = self.caches_on_the_fake()
        dumps = RedisSerializer().dumps
        with override_settings(CACHES=caches):
            from django.core.cache import caches as django_caches

            reader, make_key, _dumps = aiia_cache.lean_reader()
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
        self.assertEqual(aiia_cache.lean_reader(), (None, None, None))  # local memory again

    def test_pagecache_after_write_stores_what_djangos_cache_would(self):
        from courses import pagecache

        from aiia import cache as aiia_cache

        caches = self.caches_on_the_fake()
        django = RedisSerializer()
        data = self.server.data

        def key(name: str) -> bytes:
            return b"aiia:test:1:" + name.encode()  # Django's make_key

        def stored(name: str):
            value = data.get(key(name))
            return None if value is None else django.loads(value)

        def commands_of(call) -> list[bytes]:
            before = len(self.server.commands)
            call()
            return [c[0] for c in self.server.commands[before:] if c[0] not in (b"AUTH", b"SELECT")]

        with override_settings(CACHES=caches):
            reader = aiia_cache.lean_reader()[0]
            self.addCleanup(reader.close)
            data[key("count")] = django.dumps(41)
            data[key("gone")] = django.dumps(("tok", 1.0, b"[]"))
            data[key("v1")] = django.dumps("old")
            sent = commands_of(lambda: pagecache.after_write(["v1", "v2"], "count", 1, ("gone",)))
            # the count before the tokens (whoever sees a new token sees the new count)
            self.assertEqual(sent, [b"EXISTS", b"INCRBY", b"SET", b"SET", b"DEL"])
            self.assertEqual(stored("count"), 42)
            self.assertNotIn(stored("v1"), (None, "old"))  # a new token, as Django stores it
            self.assertEqual(len(stored("v2")), 16)
            self.assertIsNone(stored("gone"))
            # Without a count change: one round trip, no EXISTS.
            self.assertEqual(commands_of(lambda: pagecache.after_write(["v1"])), [b"SET"])
            # A missing count is not created: the next list miss recounts it.
            del data[key("count")]
            pagecache.after_write(["v1"], "count", 1)
            self.assertIsNone(stored("count"))
            # A failing command: logged, and the count dropped (what ran is unknown).
            data[key("count")] = django.dumps("not a number")
            with self.assertLogs("courses.cache", "ERROR") as logs:
                pagecache.after_write(["v1"], "count", 1)
            self.assertIn("not an integer", logs.output[0])
            self.assertIsNone(stored("count"))
