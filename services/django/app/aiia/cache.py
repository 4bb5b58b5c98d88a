"""Django's Redis cache with one Redis client per process instead of one per call.

Django's RedisCacheClient builds a new `redis.Redis` object on every cache call (about a
tenth of a worker's CPU on a cached list read, docs/performance.md), and its backend
instance, with its connection pool, exists once per thread. Here every thread of a
process shares one client (and so one connection pool) per server: redis-py's client and
pool are thread-safe, and the pool reconnects after a fork (gunicorn's workers). Answers
and keys are Django's own: only where the client object comes from changes.
"""

from __future__ import annotations

import os
import threading

from django.core.cache.backends.redis import RedisCache as DjangoRedisCache
from django.core.cache.backends.redis import RedisCacheClient as DjangoRedisCacheClient
from django.core.signals import setting_changed
from django.dispatch import receiver
from django.utils.functional import cached_property

_lock = threading.Lock()
_clients: dict[tuple, DjangoRedisCacheClient] = {}


class RedisCacheClient(DjangoRedisCacheClient):
    """Keeps the `redis.Redis` object of each server instead of building one per call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._clients_by_index: dict[int, object] = {}

    def get_client(self, key=None, *, write=False):
        index = self._get_connection_pool_index(write)
        client = self._clients_by_index.get(index)
        if client is None:
            with _lock:
                client = self._clients_by_index.get(index)
                if client is None:
                    pool = self._get_connection_pool(write)
                    client = self._clients_by_index[index] = self._client(connection_pool=pool)
        return client


class RedisCache(DjangoRedisCache):
    """`django.core.cache.backends.redis.RedisCache` sharing one client per process."""

    def __init__(self, server, params):
        super().__init__(server, params)
        self._class = RedisCacheClient

    @cached_property
    def _cache(self):
        # Same servers and options -> the same client, in every thread of this process.
        key = (os.getpid(), tuple(self._servers), repr(sorted(self._options.items())))
        with _lock:
            client = _clients.get(key)
            if client is None:
                client = _clients[key] = self._class(self._servers, **self._options)
        return client


# --- the lean reader of a cache hit (aiia/redisread.py) ---------------------------------

_reader: tuple | None = None  # (RedisReader or None, make_key, dumps), resolved on first use


def lean_reader() -> tuple:
    """(reader, make_key, dumps) for the default cache when it is this backend on one
    server, else (None, None, None): callers then use the cache itself (local memory in the
    tests). `dumps` is the cache client's serializer: what it stores, they store."""
    global _reader
    found = _reader
    if found is None:
        from django.core.cache import caches

        from aiia.redisread import RedisReader

        backend = caches["default"]
        found = (None, None, None)
        if isinstance(backend, RedisCache) and len(backend._servers) == 1:
            # the client's own serializer: the values decode exactly as get_many's
            serializer = backend._cache._serializer
            reader = RedisReader.from_url(
                backend._servers[0], loads=serializer.loads, **backend._options
            )
            found = (reader, backend.make_key, serializer.dumps)
        _reader = found
    return found


@receiver(setting_changed)
def _settings_changed(*, setting, **_kwargs):
    global _reader
    if setting == "CACHES":
        _reader = None
