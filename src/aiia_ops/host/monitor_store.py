"""The monitor's history: one small SQLite file on the host, bounded in size.

<state_dir>/monitor/history.sqlite3 holds
  probes(ts, subject, ok)                   every health probe of every run: availability
  http_minutes(vhost, minute, requests, errors, h0..h27)
                                            access-log minutes: error rate and p95 charts
  runs(ts, state, duration_ms, peak_rss_kb) one row per recorded run
  alerts(key, notified, sent, held)         what Slack was last told, per check
  meta(key, value)                          access-log offset, last CPU counters

Bounded: rows older than RETENTION_S (8 days: the page shows 7) are deleted on every run
and the freed pages returned to the file system (auto_vacuum=incremental), so the file
settles at a few MB (docs/monitoring.md has the figure). Each run is one transaction;
a second run waits for the first (busy timeout) rather than failing.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from aiia_ops.commands.monitor import NBUCKETS, AlertMemory, HttpStats

RETENTION_S = 8 * 86400

# One integer column per latency bucket: merging minutes (a minute read by two runs, 5-minute
# or hourly chart points) is a SQL sum, so a week of history never enters Python as rows.
_BUCKETS = [f"h{i}" for i in range(NBUCKETS)]

_SCHEMA = """
create table if not exists probes (
    ts real not null, subject text not null, ok integer not null,
    primary key (subject, ts)) without rowid;
create table if not exists http_minutes (
    vhost text not null, minute integer not null, requests integer not null,
    errors integer not null, {buckets},
    primary key (vhost, minute)) without rowid;
create table if not exists runs (
    ts real primary key, state text not null, duration_ms integer, peak_rss_kb integer);
create table if not exists alerts (
    key text primary key, notified text not null, sent text not null, held integer not null);
create table if not exists meta (key text primary key, value text not null);
""".replace("{buckets}", ", ".join(f"{b} integer not null default 0" for b in _BUCKETS))

_SUMS = ", ".join(f"sum({b})" for b in _BUCKETS)


class Store:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        if new:
            self.db.execute("pragma auto_vacuum = incremental")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- a transaction per run ---
    def begin(self) -> None:
        self.db.execute("begin immediate")

    def commit(self) -> None:
        self.db.execute("commit")

    # --- meta ---
    def get(self, key: str, default=None):
        row = self.db.execute("select value from meta where key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def put(self, key: str, value) -> None:
        self.db.execute(
            "insert into meta (key, value) values (?, ?) "
            "on conflict(key) do update set value = excluded.value",
            (key, json.dumps(value)),
        )

    # --- probes ---
    def add_probes(self, ts: float, results: dict[str, bool]) -> None:
        self.db.executemany(
            "insert or replace into probes (ts, subject, ok) values (?, ?, ?)",
            [(ts, s, int(ok)) for s, ok in results.items()],
        )

    def probes(self, since: float) -> dict[str, list[tuple[float, bool]]]:
        out: dict[str, list[tuple[float, bool]]] = {}
        for subject, ts, ok in self.db.execute(
            "select subject, ts, ok from probes where ts >= ? order by subject, ts", (since,)
        ):
            out.setdefault(subject, []).append((ts, bool(ok)))
        return out

    def downtime(
        self, since: float, now: float, interval_s: float
    ) -> dict[str, tuple[int, float, float]]:
        """Per subject since `since`: (probes, seconds down, first probe time), computed in
        SQL the way `monitor.availability()` does in Python: a failed probe is down until
        the next probe (or `now`), at most one interval."""
        return {
            subject: (n, down or 0.0, first)
            for subject, n, first, down in self.db.execute(
                "select subject, count(*), min(ts), sum(case when ok = 0 then "
                "min(?, max(0, coalesce(nxt, ?) - ts)) else 0 end) from ("
                "  select subject, ts, ok, lead(ts) over (partition by subject order by ts) as nxt"
                "  from probes where ts >= ?) group by subject",
                (interval_s, now, since),
            )
        }

    # --- http minutes ---
    def add_http(self, minutes: dict[tuple[str, int], HttpStats]) -> None:
        """Add new access-log minutes to the stored ones (a minute may span two runs)."""
        cols = ", ".join(_BUCKETS)
        marks = ", ".join("?" * (4 + NBUCKETS))
        adds = ", ".join(f"{c} = {c} + excluded.{c}" for c in ["requests", "errors", *_BUCKETS])
        self.db.executemany(
            f"insert into http_minutes (vhost, minute, requests, errors, {cols}) "
            f"values ({marks}) on conflict(vhost, minute) do update set {adds}",
            [(v, mi, st.requests, st.errors, *st.hist) for (v, mi), st in minutes.items()],
        )

    def http(self, since: float) -> list[tuple[str, int, HttpStats]]:
        """Stored minutes since `since` (for the 5-minute window: a handful of rows)."""
        return self.http_binned(since, 60)

    def http_binned(self, since: float, step: int) -> list[tuple[str, int, HttpStats]]:
        """Minutes since `since` merged into points of `step` seconds (aligned on `since`),
        summed in SQL: (vhost, start of the point, HttpStats)."""
        start = int(since)
        return [
            (vhost, point, HttpStats(req, err, list(hist)))
            for vhost, point, req, err, *hist in self.db.execute(
                f"select vhost, ? + (minute - ?) / ? * ? as point, sum(requests), sum(errors), "
                f"{_SUMS} from http_minutes where minute >= ? group by vhost, point "
                "order by point",
                (start, start, step, step, start),
            )
        ]

    # --- runs ---
    def add_run(self, ts: float, state: str, duration_ms: int, peak_rss_kb: int) -> None:
        self.db.execute(
            "insert or replace into runs (ts, state, duration_ms, peak_rss_kb) values (?,?,?,?)",
            (ts, state, duration_ms, peak_rss_kb),
        )

    def runs(self, since: float) -> list[tuple[float, str, int, int]]:
        return list(
            self.db.execute(
                "select ts, state, duration_ms, peak_rss_kb from runs where ts >= ? order by ts",
                (since,),
            )
        )

    # --- alert memory ---
    def alert_memory(self) -> dict[str, AlertMemory]:
        return {
            key: AlertMemory(notified, json.loads(sent), held)
            for key, notified, sent, held in self.db.execute(
                "select key, notified, sent, held from alerts"
            )
        }

    def save_alert_memory(self, memory: dict[str, AlertMemory]) -> None:
        self.db.executemany(
            "insert or replace into alerts (key, notified, sent, held) values (?, ?, ?, ?)",
            [(k, m.notified, json.dumps(m.sent), m.held) for k, m in memory.items()],
        )

    # --- bounds ---
    def prune(self, now: float | None = None, retention_s: float = RETENTION_S) -> None:
        cutoff = (now or time.time()) - retention_s
        self.db.execute("delete from probes where ts < ?", (cutoff,))
        self.db.execute("delete from http_minutes where minute < ?", (cutoff,))
        self.db.execute("delete from runs where ts < ?", (cutoff,))

    def vacuum(self) -> None:
        """Outside a transaction: give freed pages back to the file system."""
        self.db.executescript("pragma incremental_vacuum;")  # steps to the end: all pages

    def size(self) -> int:
        return self.path.stat().st_size
