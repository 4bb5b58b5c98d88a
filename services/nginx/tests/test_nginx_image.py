"""The aiia/nginx image running the real nginx on the rendered config.

Each module run builds the image (cached layers make that quick), renders the config with
the real model and renderer, starts one container with the mounts, sysctl and memory limit
the compose file gives it, on random ports of 127.0.0.1, and removes it at the end.

Upstreams point at 127.0.0.1 inside the container: prod at a stand-in backend served by
the same nginx (a test-only conf.d file that echoes the request headers), staging at a
port where nothing listens. No traffic leaves this machine.
"""

from __future__ import annotations

import email.utils
import gzip
import http.client
import json
import os
import socket
import ssl
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from nginx_testlib import SERVICE_DIR, render_nginx, write_tree

from aiia_ops import DEFAULT_STACK
from aiia_ops.model import load_stack

pytestmark = pytest.mark.docker

STACK = load_stack(DEFAULT_STACK)
IMAGE = os.environ.get("AIIA_NGINX_IMAGE", "aiia/nginx:test")
NAMES = ["eduaiia.com", "www.eduaiia.com", "staging.eduaiia.com", "devstatus.eduaiia.com"]
UPSTREAMS = {"prod": "127.0.0.1:18000", "staging": "127.0.0.1:18001"}
THIRTY_DAYS = 30 * 86400

# The stand-in for gunicorn: echoes what nginx forwarded, and how many requests the
# upstream connection has carried (> 1 = nginx kept it alive).
ECHOED = {
    "host": "$http_host",
    "xff": "$http_x_forwarded_for",
    "proto": "$http_x_forwarded_proto",
    "xfh": "$http_x_forwarded_host",
    "connection": "$http_connection",
    "request_id": "$http_x_request_id",
    "connection_requests": "$connection_requests",
}
BACKEND_CONF = f"""
server {{
    listen 127.0.0.1:18000;
    access_log off;
    location / {{
        default_type application/json;
        return 200 '{json.dumps(ECHOED)}';
    }}
}}
"""
CSS = "".join(f".rule-{i} {{ color: #{i:06x}; margin: {i}px; }}\n" for i in range(200))


def docker(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        pytest.fail(f"docker {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def image() -> str:
    try:
        engine = docker("info", "--format", "{{.ServerVersion}}", check=False, timeout=30)
    except FileNotFoundError:
        pytest.skip("no docker client")
    if engine.returncode != 0:
        pytest.skip(f"no Docker engine: {engine.stderr.strip()}")
    if "AIIA_NGINX_IMAGE" not in os.environ:
        if docker("image", "inspect", "aiia/base:trixie", check=False).returncode != 0:
            pytest.fail("the base image aiia/base:trixie is missing: run `invoke provision`")
        docker("build", "-q", "-t", IMAGE, str(SERVICE_DIR), timeout=900)
    return IMAGE


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The host folders the compose file mounts, with a little content."""
    root = tmp_path_factory.mktemp("nginx-site")
    root.chmod(0o755)
    files = render_nginx(upstreams=UPSTREAMS)
    files["conf.d/zz-test-backend.conf"] = BACKEND_CONF
    write_tree(files, root / "config")
    for writable in ("ssl", "logs"):  # owned by UID 10001 in production; open here
        (root / writable).mkdir()
        (root / writable).chmod(0o777)
    content = {
        "acme/.well-known/acme-challenge/token-abc": "token-abc.thumbprint",
        "storage/prod/static/css/app.css": CSS,
        "storage/prod/media/notes.txt": "uploaded\n",
        "storage/staging/static/app.js": "console.log('staging');\n",
    }
    for rel, text in content.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    # collectstatic writes FILE.gz beside each text file; nginx serves it (gzip_static) and
    # never compresses a static file itself.
    css = root / "storage/prod/static/css/app.css"
    css.with_name("app.css.gz").write_bytes(gzip.compress(CSS.encode(), mtime=0))
    (root / "status").mkdir()
    for d in [root, *root.rglob("*")]:
        if not str(d).startswith(str(root / "ssl")) and not str(d).startswith(str(root / "logs")):
            d.chmod(0o755 if d.is_dir() else 0o644)
    return root


@dataclass
class Nginx:
    name: str
    http_port: int
    https_port: int
    site: Path

    def exec(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return docker("exec", self.name, *args, check=check)


def _published(name: str, port: int) -> int:
    out = docker("port", name, f"{port}/tcp").stdout.strip().splitlines()[0]
    return int(out.rsplit(":", 1)[1])


def run_args(name: str, image: str, site: Path) -> list[str]:
    nginx = STACK.services.nginx
    mounts = {
        "config": ("/etc/aiia", "ro"),
        "ssl": ("/etc/nginx/ssl", "rw"),
        "logs": ("/var/log/nginx", "rw"),
        "acme": ("/var/www/acme", "ro"),
        "storage/prod": ("/srv/storage/prod", "ro"),
        "storage/staging": ("/srv/storage/staging", "ro"),
        "status": ("/srv/status", "ro"),
    }
    args = [
        "run", "-d", "--name", name,
        "--sysctl", "net.ipv4.ip_unprivileged_port_start=0",
        "--memory", str(nginx.memory.limit.bytes),
        "--memory-swap", str(nginx.memory.limit.bytes),
        "--cpus", str(nginx.cpu.limit),
        # The image's own check, polled every second instead of every 30 s.
        "--health-interval", "1s",
        "-p", "127.0.0.1::80", "-p", "127.0.0.1::443",
    ]  # fmt: skip
    for rel, (target, mode) in mounts.items():
        args += ["-v", f"{site / rel}:{target}:{mode}"]
    return [*args, image]


@pytest.fixture(scope="module")
def nginx(image, site):
    name = f"aiia-nginx-test-{uuid.uuid4().hex[:10]}"
    docker(*run_args(name, image, site))
    try:
        box = Nginx(name, _published(name, 80), _published(name, 443), site)
        deadline = time.monotonic() + 30
        while box.exec("aiia-healthcheck", check=False).returncode != 0:
            state = docker("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            if state != "running" or time.monotonic() > deadline:
                logs = docker("logs", name, check=False)
                pytest.fail(f"nginx did not come up ({state}):\n{logs.stdout}{logs.stderr}")
            time.sleep(0.2)
        yield box
    finally:
        docker("rm", "-f", "-v", name, check=False)


# --- clients ------------------------------------------------------------------------------


def tls_context(alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the placeholder is self-signed (`curl -k`)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


class HTTPSTo127(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1:port with any SNI (`curl --resolve NAME:PORT:127.0.0.1 -k`)."""

    def __init__(self, port: int, sni: str | None):
        super().__init__("127.0.0.1", port, timeout=10, context=tls_context())
        self.sni = sni

    def connect(self):
        raw = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.sni)


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def get(conn: http.client.HTTPConnection, host: str, path: str, **headers: str) -> Answer:
    conn.request("GET", path, headers={"Host": host, **headers})
    resp = conn.getresponse()
    return Answer(resp.status, resp.headers, resp.read())


def https(nginx: Nginx, host: str, path: str, **headers: str) -> Answer:
    conn = HTTPSTo127(nginx.https_port, host)
    try:
        return get(conn, host, path, **headers)
    finally:
        conn.close()


def plain(nginx: Nginx, host: str, path: str) -> Answer:
    conn = http.client.HTTPConnection("127.0.0.1", nginx.http_port, timeout=10)
    try:
        return get(conn, host, path)
    finally:
        conn.close()


def s_client(nginx: Nginx, sni: str, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{nginx.https_port}",
         "-servername", sni, *options],
        input="", capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


# --- the tests ----------------------------------------------------------------------------


def test_the_image_healthcheck_is_the_architectures(image):
    config = json.loads(docker("image", "inspect", "--format", "{{json .Config}}", image).stdout)
    assert config["Healthcheck"] == {
        "Test": ["CMD", "aiia-healthcheck", "/health"],
        "Interval": 30 * 10**9,
        "Timeout": 10 * 10**9,
        "Retries": 3,
    }
    assert config["User"] == "aiia:aiia"
    assert config["Cmd"] == ["nginx", "-c", "/etc/aiia/nginx.conf", "-g", "daemon off;"]
    assert config["StopSignal"] == "SIGQUIT"


def test_nginx_accepts_the_rendered_config(nginx):
    result = nginx.exec("nginx", "-c", "/etc/aiia/nginx.conf", "-t", check=False)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_every_nginx_process_runs_as_uid_10001(nginx):
    script = (
        'for p in /proc/[0-9]*; do read -r comm < "$p/comm"; '
        'while read -r key uid _; do [[ $key == Uid: ]] && echo "$comm $uid"; '
        'done < "$p/status"; done; true'
    )
    lines = nginx.exec("bash", "-c", script).stdout.split("\n")
    procs = [ln.split() for ln in lines if ln.startswith("nginx")]
    assert len(procs) >= 2, lines  # master + at least one worker
    assert {uid for _, uid in procs} == {"10001"}


def test_https_for_eduaiia_com_with_the_placeholder_certificate(nginx):
    answer = https(nginx, "eduaiia.com", "/")
    assert answer.status == 200
    assert answer.headers["Strict-Transport-Security"] == "max-age=31536000"
    assert "nginx/" not in answer.headers.get("Server", "")  # server_tokens off

    cert = nginx.site / "ssl/live/eduaiia.com"
    assert (cert / "PLACEHOLDER").is_file()
    san = subprocess.run(
        ["openssl", "x509", "-in", str(cert / "fullchain.pem"), "-noout", "-ext",
         "subjectAltName"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert [n.strip().removeprefix("DNS:") for n in san.split("\n", 1)[1].split(",")] == NAMES
    for vhost in ("staging.eduaiia.com", "devstatus.eduaiia.com"):
        assert (nginx.site / f"ssl/live/{vhost}/fullchain.pem").is_file()
        assert (nginx.site / f"ssl/live/{vhost}/privkey.pem").stat().st_mode & 0o077 == 0


def test_http2_is_offered(nginx):
    raw = socket.create_connection(("127.0.0.1", nginx.https_port), timeout=10)
    with tls_context(["h2", "http/1.1"]).wrap_socket(raw, server_hostname="eduaiia.com") as s:
        assert s.selected_alpn_protocol() == "h2"


def test_proxy_forwards_host_proto_and_client_address_over_keepalive(nginx):
    conn = HTTPSTo127(nginx.https_port, "eduaiia.com")
    try:
        # Not under /api/: identical anonymous API reads may come from the edge cache.
        first = get(conn, "eduaiia.com", "/echo", **{"X-Forwarded-For": "6.6.6.6"})
        second = get(conn, "eduaiia.com", "/echo")
    finally:
        conn.close()
    assert first.status == 200
    echoed = first.json()
    assert echoed["host"] == "eduaiia.com"
    assert echoed["proto"] == "https"
    assert echoed["xfh"] == "eduaiia.com"
    assert echoed["xff"] not in ("", "6.6.6.6")  # the peer's address, not the client's claim
    assert echoed["connection"] == ""  # HTTP/1.1 keep-alive to the upstream
    assert len(echoed["request_id"]) == 32
    # The same upstream connection carried both requests (keepalive in the upstream block).
    reused = int(second.json()["connection_requests"]) - int(echoed["connection_requests"])
    assert reused == 1


def test_anonymous_api_reads_come_from_the_edge_cache_for_a_second(nginx):
    """stack.yml services.nginx.settings.api_cache: 1s (docs/performance.md)."""
    path = f"/api/cached-{time.time_ns()}"
    first = https(nginx, "eduaiia.com", path).json()
    again = https(nginx, "eduaiia.com", path).json()
    assert again["request_id"] == first["request_id"], "served from the cache"
    with_token = https(nginx, "eduaiia.com", path, Authorization="Bearer x").json()
    assert with_token["request_id"] != first["request_id"], "a token bypasses the cache"
    with_session = https(nginx, "eduaiia.com", path, Cookie="sessionid=abc").json()
    assert with_session["request_id"] != first["request_id"], "so does a session"
    time.sleep(2.1)  # nginx counts validity in whole seconds: 1s lasts 1 to 2 s
    later = https(nginx, "eduaiia.com", path).json()
    assert later["request_id"] != first["request_id"], "expired"
    outside = [https(nginx, "eduaiia.com", "/echo").json()["request_id"] for _ in range(2)]
    assert outside[0] != outside[1], "only /api/ is cached"


def test_www_is_served_by_the_prod_vhost(nginx):
    assert https(nginx, "www.eduaiia.com", "/").json()["host"] == "www.eduaiia.com"


def test_staging_vhost_uses_its_own_upstream(nginx):
    answer = https(nginx, "staging.eduaiia.com", "/")
    assert answer.status == 502  # nothing listens on staging's stand-in upstream
    assert answer.headers["Strict-Transport-Security"] == "max-age=31536000"
    assert https(nginx, "staging.eduaiia.com", "/static/app.js").status == 200


def test_http_redirects_to_https(nginx):
    for host in NAMES:
        answer = plain(nginx, host, "/some/page?x=1")
        assert answer.status == 301, host
        assert answer.headers["Location"] == f"https://{host}/some/page?x=1"


def test_acme_challenges_are_served_over_http(nginx):
    for host in ("eduaiia.com", "staging.eduaiia.com"):
        answer = plain(nginx, host, "/.well-known/acme-challenge/token-abc")
        assert (answer.status, answer.body) == (200, b"token-abc.thumbprint")
    assert plain(nginx, "eduaiia.com", "/.well-known/acme-challenge/nope").status == 404


# nginx's 444 closes without a byte; the client sees the close, or a reset when the
# socket is torn down with its request still unread (no docker-proxy in between).
NO_ANSWER = (http.client.RemoteDisconnected, ConnectionResetError)


def test_unknown_host_gets_no_content(nginx):
    with pytest.raises(NO_ANSWER):
        plain(nginx, "attacker.example", "/")
    with pytest.raises(NO_ANSWER):
        plain(nginx, "127.0.0.1", "/")
    # A known SNI with an unknown Host header: the TLS default server, which says nothing.
    conn = HTTPSTo127(nginx.https_port, "eduaiia.com")
    try:
        with pytest.raises(NO_ANSWER):
            get(conn, "attacker.example", "/")
    finally:
        conn.close()


def test_unknown_or_missing_sni_is_refused_in_the_handshake(nginx):
    for sni in ("attacker.example", None):
        raw = socket.create_connection(("127.0.0.1", nginx.https_port), timeout=10)
        with pytest.raises(ssl.SSLError), tls_context().wrap_socket(raw, server_hostname=sni):
            pass


def test_health_answers_200_inside_and_nothing_through_the_published_port(nginx):
    assert nginx.exec("aiia-healthcheck", "/health", check=False).returncode == 0
    assert nginx.exec("aiia-healthcheck", "/nope", check=False).returncode == 1
    with pytest.raises(NO_ANSWER):
        plain(nginx, "localhost", "/health")


def test_tls_1_1_is_refused_1_2_and_1_3_are_accepted(nginx):
    # SECLEVEL=0 lets the client offer TLS 1.1: the refusal must come from the server.
    old = s_client(nginx, "eduaiia.com", "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0")
    assert old.returncode != 0
    assert "no protocols available" not in old.stderr
    assert "alert protocol version" in old.stderr or "wrong version" in old.stderr, old.stderr
    for flag, name in (("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")):
        ok = s_client(nginx, "eduaiia.com", flag)
        assert ok.returncode == 0, ok.stderr
        assert f"Protocol  : {name}" in ok.stdout or f"New, {name}" in ok.stdout, ok.stdout


def test_session_tickets_are_off(nginx):
    result = s_client(nginx, "eduaiia.com", "-tls1_2")
    assert "TLS session ticket:" not in result.stdout


def test_static_file_cached_30_days_and_gzipped_when_asked(nginx):
    answer = https(nginx, "eduaiia.com", "/static/css/app.css", **{"Accept-Encoding": "gzip"})
    assert answer.status == 200
    assert answer.headers["Content-Type"] == "text/css"
    assert answer.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(answer.body).decode() == CSS
    assert answer.headers.get_all("Cache-Control") == [f"max-age={THIRTY_DAYS}", "public"]
    expires = email.utils.parsedate_to_datetime(answer.headers["Expires"])
    date = email.utils.parsedate_to_datetime(answer.headers["Date"])
    assert (expires - date).total_seconds() == THIRTY_DAYS
    assert answer.headers["Strict-Transport-Security"] == "max-age=31536000"

    identity = https(nginx, "eduaiia.com", "/static/css/app.css")
    assert "Content-Encoding" not in identity.headers
    assert identity.body.decode() == CSS


def test_media_is_served_with_nosniff(nginx):
    answer = https(nginx, "eduaiia.com", "/media/notes.txt")
    assert (answer.status, answer.body) == (200, b"uploaded\n")
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert "public" in answer.headers.get_all("Cache-Control")
    assert https(nginx, "eduaiia.com", "/media/missing.txt").status == 404


def test_status_page_shows_the_placeholder_until_published(nginx):
    answer = https(nginx, "devstatus.eduaiia.com", "/")
    assert answer.status == 200
    assert b"has not been published yet" in answer.body
    assert answer.headers["Cache-Control"] == "no-cache"
    assert answer.headers["Strict-Transport-Security"] == "max-age=31536000"
    assert https(nginx, "devstatus.eduaiia.com", "/missing.html").status == 404


def test_access_log_is_one_json_object_per_request(nginx):
    marker = f"/api/log-{uuid.uuid4().hex}"
    static = f"/static/css/app.css?log={uuid.uuid4().hex}"
    sent = https(nginx, "eduaiia.com", marker, **{"User-Agent": 'quote " and \\ backslash'})
    https(nginx, "eduaiia.com", static)
    plain(nginx, "staging.eduaiia.com", marker)
    log = nginx.site / "logs/access.log"
    deadline = time.monotonic() + 3 * STACK.services.nginx.settings.access_log_flush.seconds
    # Each worker has its own buffer: wait for every line.
    found: dict[tuple[str, str], dict] = {}
    records: list[dict] = []
    while len(found) < 3 and time.monotonic() < deadline:
        if log.exists():
            records = [json.loads(line) for line in log.read_text().splitlines()]
            found = {(r["uri"], r["status"]): r for r in records if r["uri"] in (marker, static)}
        time.sleep(0.5)
    assert set(found) == {(marker, "200"), (marker, "301"), (static, "200")}, (
        "the buffered access log was not flushed in time"
    )
    redirect, record = found[(marker, "301")], found[(marker, "200")]
    assert (redirect["vhost"], redirect["ssl_protocol"]) == ("staging.eduaiia.com", "")
    assert record["vhost"] == "eduaiia.com"
    assert record["host"] == "eduaiia.com"
    assert record["status"] == "200"
    assert record["upstream_addr"] == "127.0.0.1:18000"
    assert float(record["request_time"]) >= 0
    assert float(record["upstream_response_time"]) >= 0
    assert record["user_agent"] == 'quote " and \\ backslash'
    assert record["ssl_protocol"] == "TLSv1.3"
    # The id the upstream got as X-Request-ID; none where nginx answered alone.
    assert record["request_id"] == sent.json()["request_id"]
    assert len(record["request_id"]) == 32
    assert found[(static, "200")]["request_id"] == ""
    assert found[(static, "200")]["upstream_addr"] == ""
    assert redirect["request_id"] == ""
    assert all(r["uri"] != "/health" for r in records), "health checks stay out of the log"


def test_container_reports_healthy(nginx):
    deadline = time.monotonic() + 30
    status = ""
    while time.monotonic() < deadline:
        status = docker("inspect", "--format", "{{.State.Health.Status}}", nginx.name).stdout
        if status.strip() == "healthy":
            break
        time.sleep(0.5)
    assert status.strip() == "healthy"


def test_idle_memory_is_well_inside_the_limit(nginx):
    usage = docker("stats", "--no-stream", "--format", "{{.MemUsage}}", nginx.name).stdout
    used = usage.split("/")[0].strip()
    value, unit = float(used[:-3]), used[-3:]
    mib = value / 1024 if unit == "KiB" else value if unit == "MiB" else value * 1024
    assert mib < STACK.services.nginx.memory.limit.mb / 2, usage


def test_graceful_reload_works_as_the_unprivileged_user(nginx):
    result = nginx.exec("nginx", "-c", "/etc/aiia/nginx.conf", "-s", "reload", check=False)
    assert result.returncode == 0, result.stderr
    time.sleep(1)
    assert https(nginx, "eduaiia.com", "/").status == 200


def test_restart_keeps_the_placeholder_certificate(nginx):
    cert = nginx.site / "ssl/live/eduaiia.com/fullchain.pem"
    before = cert.read_bytes()
    docker("restart", "-t", "10", nginx.name)
    deadline = time.monotonic() + 30
    while nginx.exec("aiia-healthcheck", check=False).returncode != 0:
        assert time.monotonic() < deadline, "nginx did not come back after a restart"
        time.sleep(0.2)
    assert cert.read_bytes() == before
    nginx.http_port = _published(nginx.name, 80)
    nginx.https_port = _published(nginx.name, 443)
    assert https(nginx, "eduaiia.com", "/").status == 200


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ("config", "/etc/aiia/nginx.conf is missing: mount the rendered nginx directory"),
        ("ssl", "must be writable by UID 10001"),
        ("logs", "cannot write /var/log/nginx"),
        ("privkey", "privkey.pem is not readable by UID 10001"),
    ],
)
def test_entrypoint_says_what_to_fix_when_a_mount_is_wrong(image, site, tmp_path, broken, message):
    name = f"aiia-nginx-test-{uuid.uuid4().hex[:10]}"
    args = run_args(name, image, site)
    run = args[args.index("-d") + 1 :]  # foreground, same mounts and limits
    bad = tmp_path / "bad"
    bad.mkdir()
    bad.chmod(0o755)  # root's, not writable by 10001
    if broken == "config":
        run = [a.replace(f"{site / 'config'}:", f"{bad}:") for a in run]
    elif broken in ("ssl", "logs"):
        run = [a.replace(f"{site / broken}:", f"{bad}:") for a in run]
    else:
        key = bad / "live/eduaiia.com/privkey.pem"
        key.parent.mkdir(parents=True)
        (key.parent / "fullchain.pem").write_text("certificate")
        key.write_text("key")
        key.chmod(0o600)
        run = [a.replace(f"{site / 'ssl'}:", f"{bad}:") for a in run]
    try:
        result = docker("run", *run, check=False, timeout=60)
    finally:
        docker("rm", "-f", name, check=False)
    assert result.returncode == 1
    assert message in result.stderr
