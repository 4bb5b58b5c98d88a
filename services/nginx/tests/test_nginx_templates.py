"""The rendered nginx config says what the architecture asks, for the real deploy/stack.yml.

Pure: renders with aiia_ops.commands.render and parses the text; no engine, no nginx binary.
`test_nginx_image.py` runs the real nginx on the same files.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess

import pytest
import yaml
from nginx_testlib import (
    SERVICE_DIR,
    UPSTREAMS,
    find_tool,
    location,
    parse_conf,
    render_nginx,
    servers,
)

from aiia_ops import DEFAULT_STACK
from aiia_ops.commands.templating import nginx_size
from aiia_ops.model import load_stack, stack_from_data

STACK = load_stack(DEFAULT_STACK)
NGINX = STACK.services.nginx
THIRTY_DAYS = 30 * 86400
ALL_NAMES = ["eduaiia.com", "www.eduaiia.com", "staging.eduaiia.com", "devstatus.eduaiia.com"]


@pytest.fixture(scope="module")
def files() -> dict[str, str]:
    return render_nginx()


@pytest.fixture(scope="module")
def conf(files):
    return {path: parse_conf(text) for path, text in files.items()}


@pytest.fixture(scope="module")
def http(conf):
    return conf["nginx.conf"].one("http")


def test_renders_the_main_file_default_server_one_vhost_per_environment_and_status(files):
    assert sorted(files) == [
        "conf.d/00-default.conf",
        "conf.d/prod.conf",
        "conf.d/staging.conf",
        "conf.d/status.conf",
        "nginx.conf",
    ]


def test_every_file_parses_and_says_it_is_rendered(files, conf):
    for path, text in files.items():
        assert "rendered from services/nginx/templates/" in text, path
        assert conf[path].block, path


# --- nginx.conf ---------------------------------------------------------------------------


def test_workers_and_process_files_fit_a_non_root_container(conf):
    main = conf["nginx.conf"]
    # 1, not auto: nginx's CPU limit is 0.5 (docs/performance.md)
    assert main.arg("worker_processes") == str(NGINX.settings.worker_processes) == "1"
    assert main.one("events").arg("worker_connections") == "2048"
    assert main.arg("pid") == "/tmp/nginx.pid"
    assert main.arg("error_log") == "stderr warn"
    assert not main.find("user"), "the master is not root: a user directive is only a warning"


def test_every_temp_path_is_under_tmp(http):
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        assert http.arg(f"{kind}_temp_path").startswith("/tmp/"), kind


def test_access_log_is_buffered_json_with_what_the_monitor_needs(http):
    fmt = http.one("log_format")
    assert fmt.args[:2] == ["aiia", "escape=json"]
    template = "".join(fmt.args[2:])
    for var in (
        "$host",
        "$server_name",
        "$status",
        "$request_time",
        "$upstream_response_time",
        "$upstream_addr",
    ):
        assert f'"{var}"' in template, var
    # Parseable: with values in place of the variables, one line is one JSON object.
    sample = re.sub(r"\$[a-z_0-9]+", "0.004", template)
    record = json.loads(sample)
    assert {
        "vhost",
        "host",
        "status",
        "request_time",
        "upstream_response_time",
        "upstream_addr",
    } <= set(record)
    assert all(isinstance(v, str) for v in record.values()), "every value is a JSON string"
    # The request id only of requests an upstream saw (the image test checks the values).
    assert '"request_id":"$aiia_log_request_id"' in template

    assert http.one("access_log").args == [
        "/var/log/nginx/access.log",
        "aiia",
        "buffer=32k",
        "flush=5s",
    ]
    assert nginx_size(NGINX.settings.access_log_buffer) == "32k"
    assert http.arg("ssl_buffer_size") == "16k"  # one TLS record per write (stack.yml)


def test_gzip_follows_the_settings(http):
    assert http.arg("gzip") == "on"
    assert http.arg("gzip_comp_level") == str(NGINX.settings.gzip_level) == "6"
    types = http.one("gzip_types").args
    for t in ("text/css", "application/javascript", "application/json", "image/svg+xml"):
        assert t in types
    assert int(http.arg("gzip_min_length")) > 0
    assert http.arg("gzip_vary") == "on"


def test_tls_policy_comes_from_stack_tls(http):
    assert http.one("ssl_protocols").args == ["TLSv1.2", "TLSv1.3"]
    assert http.arg("ssl_ciphers") == "HIGH:!aNULL:!MD5"
    assert http.arg("ssl_prefer_server_ciphers") == "on"
    assert http.arg("ssl_session_cache") == "shared:SSL:2m"
    assert http.arg("ssl_session_timeout") == "600s"
    assert http.arg("ssl_session_tickets") == "off"


def test_limits_and_hardening(http):
    assert http.arg("server_tokens") == "off"
    assert http.arg("client_max_body_size") == "10m"
    assert http.arg("keepalive_timeout") == "65s"
    for name in (
        "client_body_buffer_size",
        "client_header_buffer_size",
        "proxy_buffer_size",
        "ssl_buffer_size",
    ):
        assert http.find(name), f"{name} is set explicitly for a 512 MB machine"


def test_vhosts_are_included_last(http):
    assert http.block[-1].name == "include"
    assert http.block[-1].args == ["/etc/aiia/conf.d/*.conf"]


def test_figures_follow_the_model_when_it_changes():
    data = yaml.safe_load(DEFAULT_STACK.read_text())
    changed = copy.deepcopy(data)
    settings = changed["services"]["nginx"]["settings"]
    settings.update(
        worker_processes=1,
        gzip_level=4,
        access_log_buffer="64KB",
        access_log_flush="1m",
        upstream_keepalive=8,
        static_max_age="7d",
        ssl_buffer_size="4KB",
    )
    changed["tls"].update(
        session_cache_size="1MB",
        session_timeout="1h",
        session_tickets=True,
        protocols=["TLSv1.3"],
        hsts_max_age=600,
    )
    files = render_nginx(stack=stack_from_data(changed))
    http = parse_conf(files["nginx.conf"]).one("http")
    assert parse_conf(files["nginx.conf"]).arg("worker_processes") == "1"
    assert http.arg("gzip_comp_level") == "4"
    assert http.one("access_log").args[2:] == ["buffer=64k", "flush=60s"]
    assert http.arg("ssl_buffer_size") == "4k"
    assert http.arg("ssl_session_cache") == "shared:SSL:1m"
    assert http.arg("ssl_session_timeout") == "3600s"
    assert http.arg("ssl_session_tickets") == "on"
    assert http.arg("ssl_protocols") == "TLSv1.3"
    prod = parse_conf(files["conf.d/prod.conf"])
    assert prod.one("upstream").arg("keepalive") == "8"
    assert location(servers(prod, 443)[0], "^~", "/static/").arg("expires") == f"{7 * 86400}s"
    assert "max-age=600" in files["conf.d/prod.conf"]
    assert "max-age=31536000" not in files["conf.d/prod.conf"]


# --- 00-default.conf ----------------------------------------------------------------------


def test_port_80_serves_acme_challenges_and_redirects_the_known_names(conf):
    default = conf["conf.d/00-default.conf"]
    known = [s for s in servers(default, 80) if s.arg("listen") == "80"]
    # One server per virtual host, named as on 443, so the log's "vhost" agrees.
    assert [s.one("server_name").args for s in known] == [
        ["eduaiia.com", "www.eduaiia.com"],
        ["staging.eduaiia.com"],
        ["devstatus.eduaiia.com"],
    ]
    for server in known:
        acme = location(server, "^~", "/.well-known/acme-challenge/")
        assert acme.arg("root") == str(STACK.tls.acme.webroot) == "/var/www/acme"
        assert location(server, "/").arg("return") == "301 https://$host$request_uri"


def test_port_80_closes_on_unknown_hosts_and_answers_health_only_to_loopback(conf):
    default = conf["conf.d/00-default.conf"]
    (catch_all,) = [s for s in servers(default, 80) if "default_server" in s.one("listen").args]
    assert location(catch_all, "/").arg("return") == "444"
    health = location(catch_all, "=", "/health")
    assert health.arg("return") == "200 ok\\n"
    guard = health.one("if")
    assert guard.args == ["($remote_addr", "!=", "127.0.0.1", ")"]
    assert guard.arg("return") == "444"
    assert health.arg("access_log") == "off", "the healthcheck stays out of the metrics"


def test_port_443_rejects_unknown_sni(conf):
    default = conf["conf.d/00-default.conf"]
    (catch_all,) = servers(default, 443)
    assert catch_all.one("listen").args == ["443", "ssl", "default_server"]
    assert catch_all.arg("ssl_reject_handshake") == "on"
    assert catch_all.arg("return") == "444"


# --- <env>.conf ---------------------------------------------------------------------------


@pytest.mark.parametrize("env_name", ["prod", "staging"])
def test_app_vhost_proxies_to_its_upstream_with_keepalive(conf, env_name):
    env = STACK.environments[env_name]
    vhost_conf = conf[f"conf.d/{env_name}.conf"]
    upstream = vhost_conf.one("upstream")
    assert upstream.args == [f"aiia_{env_name}"]
    assert upstream.arg("server") == UPSTREAMS[env_name]
    assert upstream.arg("keepalive") == "16"
    assert int(upstream.arg("keepalive_timeout").rstrip("s")) < env.gunicorn.keepalive.seconds

    (server,) = servers(vhost_conf, 443)
    assert server.one("listen").args == ["443", "ssl"]
    assert server.arg("http2") == "on"
    assert server.one("server_name").args == env.domains
    live = f"/etc/nginx/ssl/live/{env.domains[0]}"
    assert server.arg("ssl_certificate") == f"{live}/fullchain.pem"
    assert server.arg("ssl_certificate_key") == f"{live}/privkey.pem"

    root = location(server, "/")
    assert root.arg("proxy_pass") == f"http://aiia_{env_name}"
    assert root.arg("proxy_http_version") == "1.1"
    headers = {d.args[0]: d.args[1] for d in root.find("proxy_set_header")}
    assert headers == {
        "Connection": "",
        "Host": "$host",
        "X-Forwarded-For": "$remote_addr",
        "X-Forwarded-Proto": "$scheme",
        "X-Forwarded-Host": "$host",
        "X-Real-IP": "$remote_addr",
        "X-Request-ID": "$request_id",
    }
    gunicorn_timeout = env.gunicorn.timeout.seconds
    for name in ("proxy_read_timeout", "proxy_send_timeout"):
        assert gunicorn_timeout < int(root.arg(name).rstrip("s")) <= gunicorn_timeout + 10


@pytest.mark.parametrize("env_name", ["prod", "staging"])
@pytest.mark.parametrize("kind", ["static", "media"])
def test_static_and_media_come_from_storage_cached_30_days(conf, env_name, kind):
    (server,) = servers(conf[f"conf.d/{env_name}.conf"], 443)
    loc = location(server, "^~", f"/{kind}/")
    assert loc.arg("alias") == f"/srv/storage/{env_name}/{kind}/"
    assert loc.arg("expires") == f"{THIRTY_DAYS}s"
    # Static files: the .gz collectstatic wrote, never gzipped per request; uploads: as is.
    if kind == "static":
        assert loc.arg("gzip_static") == "on"
        assert loc.arg("gzip") == "off"
    else:
        assert loc.arg("gzip_static") == "off"
    added = {d.args[0]: d.args[1:] for d in loc.find("add_header")}
    assert added["Cache-Control"] == ["public"]


def test_a_deploy_moves_the_upstream():
    files = render_nginx(upstreams={"prod": "172.20.0.13:8000", "staging": "172.20.0.4:8001"})
    assert parse_conf(files["conf.d/prod.conf"]).one("upstream").arg("server") == (
        "172.20.0.13:8000"
    )


# --- status.conf --------------------------------------------------------------------------


def test_status_page_is_static_from_srv_status(conf):
    status = conf["conf.d/status.conf"]
    (server,) = servers(status, 443)
    assert server.one("server_name").args == [STACK.status_domain] == ["devstatus.eduaiia.com"]
    assert server.arg("root") == "/srv/status"
    live = "/etc/nginx/ssl/live/devstatus.eduaiia.com"
    assert server.arg("ssl_certificate") == f"{live}/fullchain.pem"
    cache = status.one("map")
    assert cache.args == ["$sent_http_content_type", "$aiia_status_cache_control"]
    rules = {d.name: d.args for d in cache.block}
    assert rules["~*^(text/html|application/json)"] == ["no-cache"]


# --- across files -------------------------------------------------------------------------


def test_every_https_server_and_every_location_adding_headers_sends_hsts(conf):
    """add_header in a location hides the server's: each one must repeat HSTS."""
    hsts = ["Strict-Transport-Security", "max-age=31536000", "always"]
    checked = 0
    for path, tree in conf.items():
        for server in servers(tree, 443):
            if server.find("ssl_reject_handshake"):
                continue
            scopes = [server, *[d for d in server.walk() if d.name == "location"]]
            for scope in scopes:
                added = [d.args for d in scope.find("add_header")]
                if scope is server or added:
                    assert hsts in added, f"{path}: {scope.name} {scope.args}"
                    checked += 1
    assert checked >= 7


def test_each_certificate_lives_where_certbot_puts_it(conf):
    for tree in conf.values():
        for server in servers(tree, 443):
            if server.find("ssl_reject_handshake"):
                continue
            first = server.one("server_name").args[0]
            assert server.arg("ssl_certificate") == f"/etc/nginx/ssl/live/{first}/fullchain.pem"
            assert server.arg("ssl_certificate_key") == f"/etc/nginx/ssl/live/{first}/privkey.pem"


# --- the image ----------------------------------------------------------------------------


def _dockerfile_instruction(name: str) -> str:
    text = (SERVICE_DIR / "Dockerfile").read_text().replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
    return line


def test_image_healthcheck_has_the_figures_of_the_model():
    hc = NGINX.healthcheck
    line = _dockerfile_instruction("HEALTHCHECK")
    assert line == (
        f"HEALTHCHECK --interval={hc.interval.whole_seconds}s "
        f"--timeout={hc.timeout.whole_seconds}s --retries={hc.retries} "
        f'CMD ["aiia-healthcheck", "{hc.http}"]'
    )
    assert line == (
        'HEALTHCHECK --interval=30s --timeout=10s --retries=3 CMD ["aiia-healthcheck", "/health"]'
    )


def test_image_runs_the_rendered_config_as_aiia():
    assert _dockerfile_instruction("FROM") == "FROM aiia/base:trixie"
    assert _dockerfile_instruction("USER") == "USER aiia:aiia"
    assert _dockerfile_instruction("CMD") == (
        'CMD ["nginx", "-c", "/etc/aiia/nginx.conf", "-g", "daemon off;"]'
    )


def test_scripts_pass_shellcheck():
    scripts = [SERVICE_DIR / "entrypoint.sh", SERVICE_DIR / "healthcheck.sh"]
    shellcheck = find_tool("shellcheck")
    result = subprocess.run([shellcheck, *map(str, scripts)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
