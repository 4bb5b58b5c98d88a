"""Helpers for deploy tests: commits made with git plumbing, and a bounded load generator.

Commits are built from HEAD's tree with files changed, without touching the working tree
or the index, and kept alive by refs under refs/aiia-e2e/ (deleted at the end).
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

from aiia_ops import REPO_ROOT


def git(*args: str, env: dict | None = None, input: str | None = None) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO_ROOT), *args],
        check=True,
        text=True,
        capture_output=True,
        input=input,
        env={**os.environ, **(env or {})},
    ).stdout.strip()


def make_commit(name: str, changes: dict[str, str], message: str) -> str:
    """A commit on top of HEAD with `changes` (path -> new content); returns its sha."""
    index = Path(git("rev-parse", "--git-dir"))
    index = (index if index.is_absolute() else REPO_ROOT / index) / f"e2e-index-{name}"
    env = {"GIT_INDEX_FILE": str(index)}
    try:
        git("read-tree", "HEAD", env=env)
        for path, content in changes.items():
            blob = git("hash-object", "-w", "--stdin", input=content)
            git("update-index", "--add", "--cacheinfo", f"100644,{blob},{path}", env=env)
        tree = git("write-tree", env=env)
        sha = git(
            "commit-tree",
            tree,
            "-p",
            "HEAD",
            "-m",
            message,
            env={
                "GIT_AUTHOR_NAME": "e2e",
                "GIT_AUTHOR_EMAIL": "e2e@eduaiia.com",
                "GIT_COMMITTER_NAME": "e2e",
                "GIT_COMMITTER_EMAIL": "e2e@eduaiia.com",
            },
        )
    finally:
        index.unlink(missing_ok=True)
    git("update-ref", f"refs/aiia-e2e/{name}", sha)
    return sha


def head_file(path: str) -> str:
    return git("show", f"HEAD:{path}")


def drop_refs() -> None:
    for ref in git("for-each-ref", "--format=%(refname)", "refs/aiia-e2e/").splitlines():
        git("update-ref", "-d", ref)


class Load:
    """N keep-alive HTTPS clients on 127.0.0.1, until stopped (or max_seconds), on the
    paths users hit. Beside them one probe reads /health/ every 0.2 s to see which release
    answers; its answers are kept apart (`probe`): a health endpoint starved of CPU on a
    2-core machine may time out its own dependency checks, which says nothing of users."""

    def __init__(
        self,
        domain: str,
        port: int,
        clients: int = 50,
        paths=("/health/",),
        max_seconds: float = 300,
    ):
        self.domain, self.port, self.paths = domain, port, paths
        self.clients, self.max_seconds = clients, max_seconds
        self.codes: Counter = Counter()
        self.errors: Counter = Counter()
        self.versions: Counter = Counter()
        self.retried = 0  # GETs retried once after a reused connection was closed
        self.probe: Counter = Counter()  # /health/ statuses seen by the version probe
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def _connect(self) -> http.client.HTTPSConnection:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=30, context=ctx)
        conn.sock = ctx.wrap_socket(
            socket.create_connection(("127.0.0.1", self.port), 30), server_hostname=self.domain
        )
        return conn

    def _get(self, conn, path: str):
        conn.request("GET", path, headers={"Host": self.domain})
        resp = conn.getresponse()
        return resp, resp.read()

    def _client(self, n: int) -> None:
        deadline = time.monotonic() + self.max_seconds
        conn, i = None, n
        while not self._stop.is_set() and time.monotonic() < deadline:
            path = self.paths[i % len(self.paths)]
            i += 1
            try:
                if conn is None:
                    conn = self._connect()
                    resp, _ = self._get(conn, path)
                else:
                    try:
                        resp, _ = self._get(conn, path)
                    except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                        # The server closed an idle keep-alive connection as this request
                        # went out (nginx's old workers do on a graceful reload). Like a
                        # browser, retry a GET once on a new connection; count it apart.
                        conn.close()
                        with self._lock:
                            self.retried += 1
                        conn = self._connect()
                        resp, _ = self._get(conn, path)
                with self._lock:
                    self.codes[resp.status] += 1
                if resp.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                with self._lock:
                    self.errors[exc.__class__.__name__] += 1
                if conn:
                    conn.close()
                conn = None
                time.sleep(0.05)
        if conn:
            conn.close()

    def _probe(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                conn = self._connect()
                resp, body = self._get(conn, "/health/")
                conn.close()
                with self._lock:
                    self.probe[resp.status] += 1
                    if b'"version"' in body:
                        version = body.split(b'"version": "', 1)[-1].split(b'"', 1)[0]
                        self.versions[version.decode()] += 1
            except (OSError, http.client.HTTPException) as exc:
                with self._lock:
                    self.probe[exc.__class__.__name__] += 1
            self._stop.wait(0.2)

    def __enter__(self) -> Load:
        for n in range(self.clients):
            t = threading.Thread(target=self._client, args=(n,), daemon=True)
            t.start()
            self._threads.append(t)
        probe = threading.Thread(target=self._probe, daemon=True)
        probe.start()
        self._threads.append(probe)
        time.sleep(1)  # every client connected before the action under test
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(1)
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    @property
    def total(self) -> int:
        return sum(self.codes.values()) + sum(self.errors.values())

    def failures(self) -> dict:
        bad = {code: n for code, n in self.codes.items() if not 200 <= code < 300}
        return {**bad, **self.errors}


def ssh_stack_variant(out_dir: Path, ssh_spec: str, state_dir: Path) -> Path:
    """The stack file with a second host `sshbox` reached over SSH (address 127.0.0.2, its
    own state dir); the shared services stay on the first host. Written to out_dir."""
    import yaml

    from aiia_ops.model import load_stack

    data = yaml.safe_load(Path(load_stack().source).read_text())
    name, local = next(iter(data["hosts"].items()))
    # Two hosts now: each needs its own private address and the shared services a host.
    local["address"] = "127.0.0.1"
    data["hosts"]["sshbox"] = {
        **local,
        "address": "127.0.0.2",
        "ssh": ssh_spec,
        "state_dir": str(state_dir),
    }
    for service in ("nginx", "pgbouncer", "postgresql", "redis"):
        data["services"][service]["host"] = name
    variant = out_dir / "stack-ssh.yml"
    variant.write_text(yaml.safe_dump(data, sort_keys=False))
    return variant
