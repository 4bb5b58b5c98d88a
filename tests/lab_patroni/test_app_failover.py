"""Issue #16: THE APP keeps writing through a Patroni failover (lab15-17).

The built Django image (aiia/django:<this checkout>, gunicorn as in production) runs on this
machine's engine with the cluster's database settings (commands/patroni.app_database_env:
every member's HAProxy, :5000 for writes, :5001 for reads through aiia/dbrouter.py), its
port on 127.0.0.1 only. CLIENTS concurrent clients POST courses to its API (the bearer
token, JSON, two lessons each: one transaction per course) while the primary's host dies,
twice: `kill` (every process on it SIGKILLed at once, as in test_patroni.py: the peers see
resets) and `cut` (its link to the others down: it keeps running, packets to it vanish, no
reset, so the app's connections through its HAProxy only fail by the app's keepalives and
tcp_user_timeout, services/django/app/aiia/settings.py). Then:
- Patroni elected a new leader among the survivors;
- the API acknowledges writes again after a window (measured: the longest silence between
  two acknowledged writes, and the longest run of failed or slow ones);
- every failed request was a 5xx or a connection error, nothing else (no 4xx, no 201
  without the course's id);
- every course the API acknowledged (201 with an id) is in the new primary with that id,
  except at most those acknowledged within the replication lag before the failure
  (measured on the primary while the load ran): lost = 0 expected; no row is corrupt
  (title and both lessons as sent) and no row exists that was not sent;
- reads through the app after the failover see the writes: from a replica (its own
  pg_stat_statements count them, the primary's do not), and read-your-writes (a POST, then
  at once a GET with the aiia_rw cookie it set: from the primary);
- the old primary comes back (`db.up`; for `cut`, its link up again) and rejoins as a
  replica holding the same courses.

Figures go to $AIIA_PATRONI_APP_FIGURES (default /tmp/aiia-patroni-app-figures.json).
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import random
import secrets
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from aiia_ops.commands import monitor as mon
from aiia_ops.commands import patroni as p
from aiia_ops.commands.hardening import run_flags
from aiia_ops.flows import patroni as patroni_flow
from aiia_ops.host.git import head_version
from tests.conftest import run_invoke
from tests.lab_patroni.conftest import load_average, rejoin_as_replica, streaming_all

pytestmark = [pytest.mark.docker, pytest.mark.e2e]
FIGURES = Path(os.environ.get("AIIA_PATRONI_APP_FIGURES", "/tmp/aiia-patroni-app-figures.json"))
CLIENTS = int(os.environ.get("AIIA_APP_FAILOVER_CLIENTS", "24"))
PORT = 18615  # the app's port, on 127.0.0.1 only
APP = "aiia_patroni_app"
STEADY_S = 15.0  # writes before the kill
RESUMED_S = 15.0  # writes after the first one acknowledged by the new primary
AFTER_MAX_S = 120.0  # the most the load runs after the kill
SLOW_S = 1.0  # a write slower than this counts in the run of failed/slow ones
# docs/patroni.md: the window is about ttl + loop_wait + 2 s (leader key expiry, one HA loop,
# promotion, HAProxy's checks); this shared machine's load may add to it, not that much
WINDOW_SLACK_S = 20.0
REQUEST_TIMEOUT = 15.0  # > libpq's 3 x connect_timeout (3 s) over the three HAProxies
COURSES = "courses_course"
LESSONS = "courses_lesson"


def record(key: str, value) -> None:
    figures = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    figures[key] = value
    FIGURES.write_text(json.dumps(figures, indent=2))
    print(f"\n{key}: {json.dumps(value)}", flush=True)


def docker_local(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


# --- the app and its API ----------------------------------------------------------------------


class Api:
    """One client of the app: a keep-alive HTTP connection to 127.0.0.1, as nginx would
    hold one (X-Forwarded-Proto: https, which nginx sets: the production settings run)."""

    def __init__(self, port: int, token: str):
        self.port, self.token = port, token
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: dict | None = None,
                cookie: str = "") -> tuple[int, bytes, http.client.HTTPResponse]:  # fmt: skip
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT)
        headers = {"Host": "127.0.0.1", "X-Forwarded-Proto": "https"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers |= {"Content-Type": "application/json",
                        "Authorization": f"Bearer {self.token}"}  # fmt: skip
        if cookie:
            headers["Cookie"] = cookie
        try:
            self.conn.request(method, path, body=data, headers=headers)
            resp = self.conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = None
            raise
        return resp.status, raw, resp


@dataclass
class App:
    port: int
    token: str
    image: str

    def api(self) -> Api:
        return Api(self.port, self.token)


def course(slug: str) -> dict:
    """What a client sends; the database must hold exactly this (expected_row)."""
    return {"title": f"failover {slug}", "slug": slug, "summary": "written through a failover",
            "lessons": [{"title": "one", "body": f"{slug}/1"},
                        {"title": "two", "body": f"{slug}/2"}]}  # fmt: skip


def expected_row(slug: str) -> tuple[str, int, str]:
    return f"failover {slug}", 2, f"{slug}/1,{slug}/2"


@pytest.fixture(scope="module")
def app(cluster):
    """The app's image of this checkout (built when missing, as `invoke build` does), migrated
    against the cluster's primary, serving on 127.0.0.1:PORT with 2 workers x 4 threads."""
    tag = head_version()
    image = f"aiia/django:{tag}"
    if docker_local("image", "inspect", "--format", "{{.Id}}", image).returncode != 0:
        # the plain stack: the build is one host's, not the lab profile's
        run_invoke("build", "--service", "django", env={"AIIA_PROFILE": ""}, check=True,
                   timeout=1800)  # fmt: skip
    env = cluster.stack.environments["prod"]
    token = secrets.token_urlsafe(24)
    folder = Path(tempfile.mkdtemp(prefix="aiia-patroni-app-"))
    env_file = folder / "app.env"  # the secrets: 0600, never on a command line
    env_file.touch(mode=0o600)
    lines = {"DJANGO_SECRET_KEY": secrets.token_urlsafe(40), "DB_PASSWORD": cluster.db_password,
             "API_WRITE_TOKEN": token}  # fmt: skip
    env_file.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
    settings = {
        "AIIA_ENV": "prod", "APP_VERSION": tag, "DB_NAME": env.database, "DB_USER": env.db_user,
        **p.app_database_env(cluster.stack),
        "CACHE_BACKEND": "locmem",  # no Redis in this lab: the database is what is tested
        "PORT": str(PORT), "GUNICORN_WORKERS": str(env.gunicorn.workers),
        # A/B runs: e.g. {"DB_TCP_USER_TIMEOUT_MS": "0", "DB_KEEPALIVES_IDLE": "7200"} gives
        # the kernel's defaults (docs/patroni.md, "A host cut off the network")
        **json.loads(os.environ.get("AIIA_PATRONI_APP_ENV", "{}")),
    }  # fmt: skip
    common = ["--network", "host", "--env-file", str(env_file), *run_flags("app")]
    for k, v in settings.items():
        common += ["--env", f"{k}={v}"]
    docker_local("rm", "--force", APP)  # a killed run's
    migrate = docker_local("run", "--rm", *common, image, "migrate", timeout=600)
    assert migrate.returncode == 0, migrate.stdout[-2000:] + migrate.stderr[-2000:]
    limit = str(env.memory.limit.bytes)
    started = docker_local("run", "--detach", "--name", APP, "--memory", limit, "--memory-swap",
                           limit, *common, image, "gunicorn", "-c", "/etc/aiia/gunicorn.conf.py",
                           "--bind", f"127.0.0.1:{PORT}", "aiia.wsgi")  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        deadline, last = time.monotonic() + 90, ""
        while time.monotonic() < deadline:
            try:
                status, raw, _ = Api(PORT, token).request("GET", "/health/")
                if status == 200:
                    break
                last = f"{status} {raw[:200]!r}"
            except OSError as exc:
                last = repr(exc)
            time.sleep(1)
        else:
            logs = docker_local("logs", "--tail", "40", APP)
            raise AssertionError(f"the app never answered /health/ 200: {last}\n{logs.stderr}")
        yield App(PORT, token, image)
    finally:
        if os.environ.get("AIIA_E2E_KEEP") != "1":
            docker_local("rm", "--force", APP)
        env_file.unlink(missing_ok=True)
        folder.rmdir()


# --- the load ---------------------------------------------------------------------------------


@dataclass
class Write:
    client: int
    slug: str
    t0: float
    t1: float = 0.0
    status: int | None = None  # None: no HTTP answer (connection refused, reset, timeout)
    id: int | None = None
    error: str = ""

    @property
    def acked(self) -> bool:
        return self.status == 201 and self.id is not None

    @property
    def expected_failure(self) -> bool:
        """What a client may see while the database has no primary."""
        return self.status is None or self.status >= 500


def writer(api: Api, client: int, prefix: str, stop: threading.Event, out: list[Write]) -> None:
    """POST courses one after another; after a failure back off (50 ms doubling to 0.5 s, as
    a client that retries does), so the failing requests do not take the CPU the failover
    needs on this shared machine."""
    backoff = 0.0
    for seq in itertools.count():
        if stop.is_set():
            return
        w = Write(client, f"{prefix}-{client}-{seq}", time.time())
        try:
            w.status, raw, _ = api.request("POST", "/api/courses/", course(w.slug))
            if w.status == 201:
                body = json.loads(raw)
                if body.get("slug") == w.slug and isinstance(body.get("id"), int):
                    w.id = body["id"]
                else:
                    w.error = f"201 without this course's id: {raw[:120]!r}"
            else:
                w.error = f"HTTP {w.status}: {raw[:120]!r}"
        except (OSError, http.client.HTTPException, ValueError) as exc:
            w.error = type(exc).__name__
        w.t1 = time.time()
        out.append(w)  # list.append is atomic
        backoff = 0.0 if w.acked else min(0.5, max(0.05, 2 * backoff))
        time.sleep(backoff)


LAG_SQL = (
    "SELECT coalesce(max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)), -1), "
    "coalesce(max(extract(epoch FROM greatest(write_lag, flush_lag, replay_lag)) * 1000), 0), "
    "count(*) FROM pg_stat_replication;"
)


def sample_lag(cluster, lead: str, until: float) -> list[dict]:
    """The primary's own view of its replicas' lag, once a second until `until`."""
    samples = []
    while time.time() < until:
        t = time.time()
        row = cluster.local_sql(lead, LAG_SQL).split("|")
        samples.append({"t": t, "bytes": float(row[0]), "ms": float(row[1]), "n": int(row[2])})
        time.sleep(max(0.0, 1.0 - (time.time() - t)))
    return samples


def longest_bad_run(writes: list[Write]) -> tuple[int, float]:
    """The longest run of consecutive writes (by start) that failed or took > SLOW_S:
    (how many, seconds from the first one's start to the last one's answer)."""
    best, run = (0, 0.0), []
    for w in sorted(writes, key=lambda w: w.t0):
        if not w.acked or w.t1 - w.t0 > SLOW_S:
            run.append(w)
            if len(run) > best[0]:
                best = (len(run), run[-1].t1 - run[0].t0)
        else:
            run = []
    return best


# --- what the database holds ------------------------------------------------------------------


def rows_of(cluster, prefix: str, hosts: list[str]) -> dict[str, tuple[int, str, int, str]]:
    sql = (
        f"SELECT c.id, c.slug, c.title, count(l.id), coalesce(string_agg(l.body, ',' ORDER BY "
        f"l.position), '') FROM {COURSES} c LEFT JOIN {LESSONS} l ON l.course_id = c.id "
        f"WHERE c.slug LIKE '{prefix}-%' GROUP BY c.id, c.slug, c.title;"
    )
    out = {}
    for line in cluster.sql(5000, sql, hosts=hosts).splitlines():
        id_, slug, title, n, bodies = line.split("|")
        out[slug] = (int(id_), title, int(n), bodies)
    return out


def statement_calls(cluster, name: str) -> int:
    """The member's own count of the app's course-detail SELECTs (pg_stat_statements)."""
    detail = f'FROM "{COURSES}" WHERE "{COURSES}"."slug" ='
    sql = (
        "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s JOIN pg_database d ON "
        "d.oid = s.dbid WHERE d.datname = 'aiia_prod' AND s.query LIKE 'SELECT %' AND "
        f"s.query LIKE '%{detail} %';"
    )
    return int(cluster.local_sql(name, sql))


def wait_for_leader_and_replica(cluster, survivors: list[str], timeout: float = 90) -> dict:
    """A leader among the survivors and the other survivor streaming from it, caught up."""
    deadline, st = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        st = cluster.status()
        members = {m["name"]: m for m in st["members"]}
        lead = [n for n in survivors if members.get(n, {}).get("role") == "Leader"
                and members[n]["state"] == "running"]  # fmt: skip
        other = [members.get(n, {}) for n in survivors if n not in lead]
        if lead and other and other[0].get("state") == "streaming" and not other[0].get("lag_mb"):
            return {"leader": lead[0], "replica": other[0]["name"], "status": st}
        time.sleep(1)
    raise AssertionError(f"no leader with a caught-up replica among {survivors}: {st}")


def monitor_lines(cluster) -> dict[str, mon.Check]:
    """The monitor's Patroni lines (flows/monitor.py), read from the real cluster."""
    states, lag = patroni_flow.replication(cluster.stack)
    r = cluster.r
    checks = mon.replication_checks(list(r.hosts), states, lag, r.replica_max_lag.bytes / 2**20)
    return {c.subject: c for c in checks}


# --- the test ---------------------------------------------------------------------------------


def link(host: str, state: str) -> None:
    """The bridge side of a lab host's veth (commands/lab.py `veth`) up or down."""
    subprocess.run(["ip", "link", "set", f"v{host}", state], check=True, capture_output=True)


@pytest.mark.parametrize("how", ["kill", "cut"])
def test_the_app_keeps_writing_through_the_primarys_death_and_reads_its_writes(cluster, app, how):
    streaming_all(cluster)
    lead = cluster.leader()
    try:
        failover_under_load(cluster, app, how, lead)
    finally:
        if how == "cut":
            link(lead, "up")  # whatever failed: the host is not left cut off


def failover_under_load(cluster, app, how: str, lead: str) -> None:
    survivors = [n for n in cluster.hosts if n != lead]
    survivor_addresses = [cluster.hosts[n].address for n in survivors]
    prefix = f"af{int(time.time())}"
    writes: list[Write] = []
    stop = threading.Event()
    threads = [threading.Thread(target=writer, args=(app.api(), c, prefix, stop, writes),
                                daemon=True) for c in range(CLIENTS)]  # fmt: skip
    load_before = load_average()
    for t in threads:
        t.start()
    try:
        lag = sample_lag(cluster, lead, time.time() + STEADY_S)
        killed_at = time.time()
        if how == "kill":
            out = cluster.docker(lead, *p.kill_argv()[1:])
            assert out.returncode == 0, out.stderr
        else:
            link(lead, "down")
        kill_done = time.time()
        while time.time() < kill_done + AFTER_MAX_S:
            new = [w.t1 for w in list(writes) if w.acked and w.t0 >= kill_done]
            if new and time.time() > min(new) + RESUMED_S:
                break
            time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join(REQUEST_TIMEOUT + 5)
    load_during = load_average()
    assert not any(t.is_alive() for t in threads), "a client never came back from a request"

    # -- what the clients saw
    odd = [w for w in writes if not w.acked and not w.expected_failure]
    assert not odd, f"{len(odd)} answers neither 201-with-id nor 5xx/connection error: {odd[:5]}"
    acks = sorted((w for w in writes if w.acked), key=lambda w: w.t1)
    before = [w for w in acks if w.t1 <= killed_at]
    assert len(before) > 100, f"too few writes before the kill: {len(before)} of {len(writes)}"
    new_acks = [w for w in acks if w.t0 >= kill_done]  # started after the old primary died
    assert new_acks, f"no write acknowledged after the kill; last: {writes[-5:]}"
    # the outage: the longest silence between two acknowledgements from the last one before
    # the kill on (writes acked while `docker kill` ran went to the old primary)
    tail = [w for w in acks if w.t1 >= before[-1].t1]
    window, last_old, first_new = max(
        ((b.t1 - a.t1, a, b) for a, b in itertools.pairwise(tail)), key=lambda g: g[0]
    )
    failed_at = last_old.t1
    r = cluster.r
    documented = r.ttl.seconds + r.loop_wait.seconds + 2
    assert window <= documented + WINDOW_SLACK_S, f"window {window:.1f}s > {documented:g}s + slack"
    bad_run, bad_run_s = longest_bad_run(writes)
    early = [w for w in writes if not w.acked and w.t1 < killed_at]
    assert not early, f"{len(early)} writes failed before the kill: {early[:5]}"
    failed_after_resume = [w for w in writes if w.t0 >= first_new.t1 and not w.acked]
    # the app reconnects: once the new primary acknowledges, no failure a few seconds later
    # (no worker holding a dead connection)
    later = [w for w in failed_after_resume if w.t0 > first_new.t1 + 5]
    assert not later, f"{len(later)} writes failed after writes resumed: {later[:5]}"

    # -- Patroni promoted a survivor by itself
    promoted = wait_for_leader_and_replica(cluster, survivors)
    new_leader = promoted["leader"]
    lines = monitor_lines(cluster)  # the monitor names the new primary, the dead one is red
    assert lines["patroni"].state == mon.OK and lines["patroni"].detail.startswith(new_leader)
    assert lines[f"patroni/{lead}"].state == mon.CRIT, lines
    assert lines[f"patroni/{promoted['replica']}"].state == mon.OK, lines
    shown = {k: f"{c.state} {c.value_text()} {c.detail}" for k, c in lines.items()}

    # -- what the new primary holds
    present = rows_of(cluster, prefix, survivor_addresses)
    sent = {w.slug for w in writes}
    strangers = sorted(set(present) - sent)
    assert not strangers, f"rows nobody sent: {strangers[:5]}"
    corrupt = [s for s, (_, title, n, bodies) in present.items()
               if (title, n, bodies) != expected_row(s)]  # fmt: skip
    assert not corrupt, f"{len(corrupt)} courses not as sent: {[present[s] for s in corrupt[:5]]}"
    wrong_id = [w.slug for w in acks if w.slug in present and present[w.slug][0] != w.id]
    assert not wrong_id, f"acknowledged ids that are not the rows' ids: {wrong_id[:5]}"
    lost = [w for w in acks if w.slug not in present]
    pre_lag = [s for s in lag if s["t"] >= killed_at - 5] or lag
    lag_ms = max(s["ms"] for s in pre_lag)
    lag_bytes = max(s["bytes"] for s in pre_lag)
    allowed = lag_ms / 1000 + 0.1  # + the ack's own way back to the client
    late = [w for w in lost if failed_at - w.t1 > allowed]
    assert not late, f"{len(late)} acknowledged writes older than the lag were lost: {late[:5]}"
    assert not [w for w in lost if w.t0 >= kill_done], "a write acked by the new primary is lost"
    unknown_committed = [w.slug for w in writes if not w.acked and w.slug in present]

    # -- reads through the app, after the failover: a replica serves them
    for name in survivors:
        cluster.local_sql(name, "SELECT pg_stat_statements_reset();")
    rng = random.Random(7)
    old = [w for w in acks if w.t1 <= failed_at and w.slug in present]
    sample = {w.slug: w for w in [*old[-100:], *rng.sample(old, min(100, len(old))),
                                  *new_acks[:100]]}  # fmt: skip
    reader = app.api()
    unseen = []
    for slug, w in sample.items():
        status, raw, _ = reader.request("GET", f"/api/courses/{slug}/")
        if status != 200 or json.loads(raw).get("id") != w.id:
            unseen.append((slug, status, raw[:100]))
    assert not unseen, f"{len(unseen)} of {len(sample)} acked courses not read back: {unseen[:5]}"
    on_replica = statement_calls(cluster, promoted["replica"])
    on_primary = statement_calls(cluster, new_leader)
    assert on_replica >= len(sample) and on_primary == 0, (on_replica, on_primary)

    # -- read-your-writes: the page after a POST reads from the primary (the aiia_rw cookie)
    ryw_prefix = f"{prefix}r"
    for i in range(20):
        slug = f"{ryw_prefix}-{i}"
        status, raw, resp = reader.request("POST", "/api/courses/", course(slug))
        assert status == 201, (status, raw[:200])
        cookie = resp.getheader("Set-Cookie") or ""
        assert cookie.startswith("aiia_rw="), cookie
        status, got, _ = reader.request("GET", f"/api/courses/{slug}/",
                                        cookie=cookie.split(";")[0])  # fmt: skip
        assert status == 200 and json.loads(got)["id"] == json.loads(raw)["id"], (status, got)
    assert statement_calls(cluster, new_leader) >= 20

    # -- the old primary comes back and rejoins as a replica with the same courses
    count = f"SELECT count(*), coalesce(sum(id), 0) FROM {COURSES} WHERE slug LIKE '{prefix}%';"
    if how == "cut":
        link(lead, "up")  # it demoted itself when it lost etcd; back, it rewinds and follows
    rejoined_s, row = rejoin_as_replica(cluster, lead, count)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        lines = monitor_lines(cluster)
        if all(c.state == mon.OK for c in lines.values()):
            break
        time.sleep(2)
    assert all(c.state == mon.OK for c in lines.values()), lines

    statuses: dict[str, int] = {}
    for w in writes:
        if not w.acked:
            key = str(w.status) if w.status is not None else w.error
            statuses[key] = statuses.get(key, 0) + 1
    record("app_failover" if how == "kill" else "app_failover_cut", {
        "how": how, "clients": CLIENTS, "killed": lead, "promoted": new_leader,
        "requests": len(writes), "acked": len(acks), "acked_before_kill": len(before),
        "acked_by_new_primary": len(new_acks),
        "write_rate_before_kill_per_s": round(len(before) / (before[-1].t1 - before[0].t0), 1),
        "window_s": round(window, 2), "documented_window_s": documented,
        "kill_to_first_new_ack_s": round(first_new.t1 - killed_at, 2),
        "longest_run_failed_or_slow": bad_run, "longest_run_failed_or_slow_s": round(bad_run_s, 2),
        "failed": sum(statuses.values()), "failed_by_kind": statuses,
        "failed_after_first_new_ack": len(failed_after_resume),
        "acked_while_docker_kill_ran": sum(1 for w in acks if killed_at < w.t1 <= failed_at),
        "lost": len(lost), "lost_allowed_within_s": round(allowed, 3),
        "committed_but_not_acked": len(unknown_committed),
        "lag_before_kill_bytes": lag_bytes, "lag_before_kill_ms": lag_ms,
        "lag_samples": len(lag), "lag_max_ms_whole_run": max(s["ms"] for s in lag),
        "read_back_through_app": len(sample), "replica_detail_selects": on_replica,
        "read_your_writes_checked": 20, "monitor_after_failover": shown,
        "rejoined_s": round(rejoined_s, 1),
        "timeline": row["timeline"], "loadavg_before": load_before,
        "loadavg_during": load_during, "loadavg_after": load_average(),
    })  # fmt: skip
