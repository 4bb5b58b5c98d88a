"""Hostile stack files are refused cleanly: seeded random mutations of deploy/stack.yml,
the classic YAML bombs, and values built to inject lines into configs, paths and argvs.

Every mutation either loads or raises StackError/OpsError (a message for people); any
other exception fails the test with the mutation that caused it. A stack that loads also
goes through the budget check, every rendered config and the compose file, so a value the
model lets through cannot crash what reads it later.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from pathlib import Path

import pytest
import yaml

from aiia_ops.commands.compose import compose_data
from aiia_ops.commands.render import render_stack
from aiia_ops.errors import OpsError
from aiia_ops.model import StackError, load_stack, stack_from_data
from aiia_ops.model.budget import check_budget
from aiia_ops.model.secrets import EnvSecrets, Secrets
from tests.conftest import run_invoke
from tests.stackfiles import STACK, patched_stack

SEED = 20261201
DATA_MUTATIONS = 1000  # on the parsed data, through stack_from_data
TEXT_MUTATIONS = 100  # on the file's text, through load_stack on a temp file

HOSTILE = [
    None,
    True,
    0,
    -1,
    -(2**70),
    10**400,
    2**63,
    1e400,
    float("nan"),
    float("inf"),
    -float("inf"),
    0.5,
    "",
    " ",
    "x" * 5000,
    "pr\nod",
    "../../../../etc/cron.d/x",
    "--privileged",
    "a; }\nserver { listen 81; }",
    "trust\nlocal all all trust",
    "HIGH:!aNULL; } server {",
    "日本語",
    "\x00",
    "$(reboot)",
    "12XB",
    "999999999999999999999999999999999999999999GB",
    "99999999999999999999999999999d",
    "172.20.0.300",
    [],
    [1, [2, [3]]],
    {},
    {"a": {"b": {"c": {}}}},
    {1: 2},
    {None: "x"},
]
HOSTILE_KEYS = ["pr\nod", "../x", "--privileged", "", "a.b", 7, None, True, "日本", "x" * 300]


def _nest(depth: int, leaf: object = 1) -> object:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def _paths(node: object, prefix: tuple = ()) -> list[tuple]:
    """Every key path into dicts and lists of the parsed stack."""
    out = [prefix] if prefix else []
    if len(prefix) > 8:  # not into a nesting a mutation made
        return out
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, (*prefix, i))
    return out


def _parent(data: dict, path: tuple) -> tuple[object, object]:
    node = data
    for part in path[:-1]:
        node = node[part]
    return node, path[-1]


def _mutate(rng: random.Random, data: dict) -> list[str]:
    """Apply 1-3 random changes to `data` in place; returns what was done, for the report."""
    done = []
    for _ in range(rng.randint(1, 3)):
        paths = _paths(data)
        if not paths:
            break
        path = rng.choice(paths)
        parent, key = _parent(data, path)
        op = rng.choice(
            ["delete", "hostile", "hostile", "number", "nest", "rename", "swap", "unicode", "dup"]
        )
        if op == "delete":
            del parent[key]
        elif op == "hostile":
            parent[key] = copy.deepcopy(rng.choice(HOSTILE))
        elif op == "number":
            parent[key] = rng.choice(
                [10**400, -(10**30), float("nan"), float("inf"), -1, 0, 2**64, 1e308, -0.0]
            )
        elif op == "nest":
            parent[key] = _nest(rng.choice([60, 300, 2000]))
        elif op == "rename" and isinstance(parent, dict):
            parent[rng.choice(HOSTILE_KEYS)] = parent.pop(key)
        elif op == "swap":
            other_parent, other_key = _parent(data, rng.choice(paths))
            with contextlib.suppress(KeyError, IndexError):  # one was inside the other
                parent[key], other_parent[other_key] = other_parent[other_key], parent[key]
        elif op == "unicode" and isinstance(parent[key], str):
            parent[key] = parent[key] + rng.choice(["\n", "\u202e", "\ufeff", "é", " ;", "\t"])
        elif op == "dup" and isinstance(parent, dict):
            parent[f"{key}"] = parent[key]  # the same value under the key as text
        done.append(f"{op} {'.'.join(map(str, path))}")
    return done


def _text_mutate(rng: random.Random, text: str) -> tuple[str, str]:
    lines = text.splitlines(keepends=True)
    i = rng.randrange(len(lines))
    op = rng.choice(["dupline", "alias", "anchor", "tag", "chars", "cut", "tab", "brackets"])
    if op == "dupline":  # a key given twice (or a broken structure)
        lines.insert(i, lines[i])
    elif op == "alias":
        lines[i] = lines[i].rstrip("\n") + " *nowhere\n"
    elif op == "anchor":
        lines.insert(0, "x-bomb: &b [1, 2, 3, 4, 5, 6, 7, 8, 9]\n")
        lines.insert(1, "x-more: &m [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n")
        lines[-1] = lines[-1].rstrip("\n") + "\n"
        lines.append(f"x-use: [{', '.join(['*m'] * rng.randint(1, 3000))}]\n")
    elif op == "tag":
        lines[i] = lines[i].replace(": ", ": !!python/object/apply:os.system ", 1)
    elif op == "chars":
        pos = rng.randrange(len(lines[i]) or 1)
        junk = rng.choice(["\x00", "\t", "{", "[", "&", "*", "%", "@", "`", "\u2028", "'", '"'])
        lines[i] = lines[i][:pos] + junk + lines[i][pos:]
    elif op == "cut":
        lines = lines[:i]
    elif op == "tab":
        lines[i] = "\t" + lines[i]
    elif op == "brackets":
        n = rng.choice([10, 100, 10000])
        lines.insert(i, f"x-deep: {'[' * n}{']' * n}\n")
    return "".join(lines), f"{op} at line {i + 1}"


SECRETS = Secrets("pg", "redis", "admin")


def _use(stack, render: bool) -> None:
    """What reads a loaded stack: the budget check, the compose file, every config."""
    check_budget(stack)
    compose_data(stack, "/var/lib/aiia", {})
    if render:  # jinja compiles each template per call: ~0.1 s a stack, so not for all
        secrets = Secrets(
            SECRETS.postgres_password,
            SECRETS.redis_password,
            SECRETS.pgbouncer_admin_password,
            {name: EnvSecrets("db", "key", "token") for name in stack.environments},
        )
        render_stack(stack, secrets)


RENDERED = 12  # loaded stacks whose configs are rendered too


def _try(run, what: str, render: bool) -> bool:
    """True if it loaded; a clean refusal is False; anything else fails the test."""
    try:
        _use(run(), render)
    except (StackError, OpsError):
        return False
    except Exception as exc:  # the point: nothing else may escape
        pytest.fail(f"{type(exc).__name__}: {exc!s:.300} after the mutation: {what}")
    return True


def test_a_thousand_seeded_mutations_load_or_are_refused_never_a_traceback(tmp_path):
    rng = random.Random(SEED)
    base = yaml.safe_load(STACK.read_text())
    loaded = 0
    for n in range(DATA_MUTATIONS):
        data = copy.deepcopy(base)
        done = _mutate(rng, data)
        what = f"#{n}: {'; '.join(done)}"
        loaded += _try(lambda d=data: stack_from_data(d), what, loaded < RENDERED)
    text = STACK.read_text()
    path = tmp_path / "stack.yml"
    for n in range(TEXT_MUTATIONS):
        mutated, done = _text_mutate(rng, text)
        path.write_text(mutated)
        loaded += _try(lambda: load_stack(path), f"text #{n}: {done}", loaded < 2 * RENDERED)
    # Mutations are meant to break things, but not all of them must: some still load.
    assert 0 < loaded < DATA_MUTATIONS + TEXT_MUTATIONS


# --- the bombs: refused, each within one second ------------------------------------------

# 437 bytes: nine levels of nine aliases, 9**9 (387 million) "lol"s once expanded.
ALIAS_BOMB = "\n".join(
    [
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
        *(
            f"{b}: &{b} [{','.join([f'*{a}'] * 9)}]"
            for a, b in zip("abcdefgh", "bcdefghi", strict=True)
        ),
    ]
)


def _refused_fast(tmp_path: Path, text: str) -> StackError:
    path = tmp_path / "stack.yml"
    path.write_text(text)
    start = time.monotonic()
    with pytest.raises(StackError) as err:
        load_stack(path)
    elapsed = time.monotonic() - start
    assert elapsed < 1.0, f"took {elapsed:.2f} s"
    return err.value


def test_an_alias_bomb_is_refused_within_a_second(tmp_path):
    assert len(ALIAS_BOMB) <= 437
    err = _refused_fast(tmp_path, ALIAS_BOMB)
    assert err.problems == [
        "not valid YAML: more than 100000 values once aliases are expanded (an alias bomb?); "
        "write the values out or use fewer aliases"
    ]
    assert err.source.endswith("stack.yml:6:8")


def test_an_alias_that_contains_itself_is_refused(tmp_path):
    err = _refused_fast(tmp_path, "project: &p [a, *p]\n")
    assert err.problems == ["not valid YAML: alias *p refers to a value that contains it"]


def test_ten_thousand_levels_of_nesting_are_refused_within_a_second(tmp_path):
    for text in (
        "project: " + "[" * 10_000 + "]" * 10_000,
        "project: " + "{a: " * 10_000 + "1" + "}" * 10_000,
    ):
        err = _refused_fast(tmp_path, text)
        assert err.problems == [
            "not valid YAML: nested more than 50 levels deep; the stack file needs 5"
        ]
    # Block style (indentation) is limited by the composer, at the same depth.
    block = "".join(f"{' ' * i}k{i}:\n" for i in range(200)) + " " * 200 + "x\n"
    err = _refused_fast(tmp_path, block)
    assert err.problems == [
        "not valid YAML: nested more than 50 levels deep; the stack file needs 5"
    ]


def test_ten_thousand_levels_of_nesting_in_data_are_refused_within_a_second():
    start = time.monotonic()
    with pytest.raises(StackError) as err:
        stack_from_data(patched_stack({"machine": {"cpus": _nest(10_000)}}))
    assert time.monotonic() - start < 1.0
    assert err.value.problems == ["machine.cpus: expected a number, got a list"]


def test_deep_data_on_both_sides_of_the_app_merge_is_refused_not_a_recursion_error():
    deep: dict = {}
    for _ in range(10_000):
        deep = {"workers": deep}
    data = patched_stack()
    data["app"]["gunicorn"]["workers"] = deep
    data["environments"]["prod"]["gunicorn"] = {"workers": deep}
    start = time.monotonic()
    with pytest.raises(StackError) as err:
        stack_from_data(data)
    assert time.monotonic() - start < 1.0
    assert err.value.problems == [
        "environments.prod.gunicorn.workers: expected a whole number, got a mapping"
    ]


def test_huge_numbers_are_refused_within_a_second_with_the_key_path(tmp_path):
    text = STACK.read_text().replace("cpus: 2\n", "cpus: 1" + "0" * 400 + "\n", 1)
    err = _refused_fast(tmp_path, text)
    assert err.problems == [
        f"machine.cpus: 1{'0' * 56}... (401 characters)"
        " is too large; expected a number between -9.22337e+18 and 9.22337e+18"
    ]
    text = STACK.read_text().replace("disk: 20GB", "disk: 1" + "0" * 400 + "GB", 1)
    err = _refused_fast(tmp_path, text)
    assert err.problems == [
        f"machine.disk: '1{'0' * 55}... (405 characters) is too large; expected at most 1024TB"
    ]
    text = STACK.read_text().replace("cpus: 2\n", "cpus: 1" + "0" * 5000 + "\n", 1)
    err = _refused_fast(tmp_path, text)
    assert err.problems[0].endswith("... (5001 characters) is not a usable number")


@pytest.mark.parametrize(
    ("patch", "problem"),
    [
        (
            {"monitoring": {"metrics": {"cpu_percent": {"warning": math.nan}}}},
            "monitoring.metrics.cpu_percent.warning: nan is not a number; expected a finite number",
        ),
        (
            {"monitoring": {"metrics": {"availability": {"critical_below": math.inf}}}},
            "monitoring.metrics.availability.critical_below: inf is not a number; "
            "expected a finite number",
        ),
        (
            {"deploy": {"keep_releases": 2**64}},
            "deploy.keep_releases: 18446744073709551616 is too large; "
            "expected a number between -9.22337e+18 and 9.22337e+18",
        ),
        (
            {"deploy": {"drain_timeout": "99999999999999999999999999d"}},
            "deploy.drain_timeout: '99999999999999999999999999d' is too large; "
            "expected at most 3650d",
        ),
        ({"hosts": {1: {"ssh": None}}}, "hosts: keys must be text, got 1"),
        (
            {"services": {"nginx": {"settings": {"worker_processes": [[[1]]]}}}},
            "services.nginx.settings.worker_processes: expected one of 'auto' or a whole "
            "number, got a list",
        ),
    ],
    ids=["nan", "inf", "int64", "duration", "int-key", "list-in-literal"],
)
def test_numbers_and_shapes_that_broke_later_code_are_refused(patch, problem):
    with pytest.raises(StackError) as err:
        stack_from_data(patched_stack(patch))
    assert err.value.problems == [problem]


def test_no_hosts_is_refused_not_a_stop_iteration():
    data = patched_stack()
    data["hosts"] = {}
    with pytest.raises(StackError) as err:
        stack_from_data(data)
    assert err.value.problems == ["hosts: empty; expected at least one host (local: {ssh: null})"]


def test_a_mapping_as_a_key_is_refused_with_its_line(tmp_path):
    err = _refused_fast(tmp_path, "project: aiia\n? [a, b]\n: c\n")
    assert err.problems == ["not valid YAML: a key is a mapping or a list; expected a name"]
    assert err.source.endswith("stack.yml:2:3")


# --- injections: refused with the key path -------------------------------------------------

ENV_RULE = "an environment name is 1-32 of a-z 0-9 _ -, starting with a letter"


def _env_renamed(name: str) -> dict:
    data = patched_stack()
    data["environments"][name] = data["environments"].pop("staging")
    return data


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (_env_renamed("pr\nod"), f"environments: 'pr\\nod': {ENV_RULE}"),
        (
            _env_renamed("../../../../etc/cron.d/x"),
            f"environments: '../../../../etc/cron.d/x': {ENV_RULE}",
        ),
        (
            patched_stack(
                {
                    "services": {
                        "postgresql": {"settings": {"superuser": "aiia\nlocal all all trust"}}
                    }
                }
            ),
            "services.postgresql.settings.superuser: 'aiia\\nlocal all all trust': a PostgreSQL "
            "name is 1-63 of a-z 0-9 _, starting with a letter or _",
        ),
        (
            patched_stack({"services": {"postgresql": {"settings": {"superuser": "all"}}}}),
            "services.postgresql.settings.superuser: 'all' is a keyword of pg_hba.conf or "
            "PgBouncer; expected another name",
        ),
        (
            patched_stack({"tls": {"ciphers": "HIGH; } server { listen 8080; }"}}),
            "tls.ciphers: 'HIGH; } server { listen 8080; }': an OpenSSL cipher string is "
            "1-1000 of A-Z a-z 0-9 : + ! @ = _ - (such as HIGH:!aNULL)",
        ),
        (
            patched_stack({"services": {"redis": {"container": "--privileged"}}}),
            "services.redis.container: '--privileged': a container name is 1-63 of "
            "a-z 0-9 _ . -, starting with a letter or digit",
        ),
        (
            patched_stack({"environments": {"prod": {"container": "--privileged"}}}),
            "environments.prod.container: '--privileged': a container name is 1-63 of "
            "a-z 0-9 _ . -, starting with a letter or digit",
        ),
        (
            patched_stack(
                {"environments": {"prod": {"database": "aiia_prod\nhost all all 0.0.0.0/0 trust"}}}
            ),
            "environments.prod.database: 'aiia_prod\\nhost all all 0.0.0.0/0 trust': a "
            "PostgreSQL name is 1-63 of a-z 0-9 _, starting with a letter or _",
        ),
        (
            patched_stack({"project": "../../etc"}),
            "project: '../../etc': a project name is 1-32 of a-z 0-9 _ -, starting with a letter",
        ),
        (
            patched_stack({"hosts": {"local": {"state_dir": "/var/lib/../../etc/cron.d"}}}),
            "hosts.local.state_dir: '/var/lib/../../etc/cron.d': expected an absolute path of "
            "A-Z a-z 0-9 _ . @ + - and /, without . or .. parts",
        ),
        (
            patched_stack({"services": {"nginx": {"volumes": {"../../etc": "/etc/nginx/x"}}}}),
            "services.nginx.volumes: '../../etc': a volume name is 1-32 of a-z 0-9 _ -, "
            "starting with a letter",
        ),
        (
            patched_stack(
                {"environments": {"prod": {"volumes": {"storage": "/app/storage,readonly=false"}}}}
            ),
            "environments.prod.volumes.storage: '/app/storage,readonly=false': expected an "
            "absolute path of A-Z a-z 0-9 _ . @ + - and /, without . or .. parts",
        ),
        (
            patched_stack({"services": {"nginx": {"image": "aiia/nginx --privileged"}}}),
            "services.nginx.image: 'aiia/nginx --privileged': an image name is a repository "
            "such as aiia/nginx or registry:5000/aiia/nginx (a-z 0-9 . _ -, no tag)",
        ),
        (
            patched_stack({"network": {"name": "-n\nx"}}),
            "network.name: '-n\\nx': a network name is 1-63 of a-z 0-9 _ . -, starting with "
            "a letter or digit",
        ),
        (
            patched_stack({"environments": {"staging": {"domains": ["staging.eduaiia.com\n"]}}}),
            "environments.staging.domains[0]: 'staging.eduaiia.com\\n' is not a lower-case "
            "host name",
        ),
        (
            patched_stack({"hosts": {"local": {"ssh": "-oProxyCommand=x@host"}}}),
            "hosts.local.ssh: '-oProxyCommand=x@host' is not user@address[:port]",
        ),
        (
            patched_stack({"tls": {"acme": {"webroot": "/var/www/acme; }"}}}),
            "tls.acme.webroot: '/var/www/acme; }': expected an absolute path of "
            "A-Z a-z 0-9 _ . @ + - and /, without . or .. parts",
        ),
        (
            patched_stack({"tls": {"acme": {"directory": "https://x/../../../etc"}}}),
            "tls.acme.directory: 'https://x/../../../etc': expected an ACME directory URL such "
            "as https://acme-v02.api.letsencrypt.org/directory (no .. parts, query or spaces)",
        ),
        (
            patched_stack({"tls": {"acme": {"email": "--agree@x.com"}}}),
            "tls.acme.email: '--agree@x.com': expected an e-mail address such as ops@example.com",
        ),
        (
            patched_stack({"services": {"nginx": {"healthcheck": {"http": "/health\nx"}}}}),
            "services.nginx.healthcheck.http: '/health\\nx': expected a URL path such as "
            "/health/ (A-Z a-z 0-9 _ . @ + - and /)",
        ),
        (
            patched_stack({"services": {"redis": {"settings": {"bad\nkey": 1}}}}),
            "services.redis.settings['bad\\nkey']: unknown key; known keys: maxmemory, "
            "maxmemory_policy, databases, appendonly",
        ),
    ],
    ids=[
        "newline-env",
        "dotdot-env",
        "newline-superuser",
        "keyword-superuser",
        "ciphers",
        "privileged-service",
        "privileged-app",
        "newline-database",
        "dotdot-project",
        "dotdot-state-dir",
        "dotdot-volume",
        "comma-mount",
        "image-argv",
        "network",
        "newline-domain",
        "ssh-option",
        "webroot",
        "acme-path",
        "email-option",
        "healthcheck",
        "newline-key",
    ],
)
def test_each_injection_is_refused_with_its_key_path(data, problem):
    with pytest.raises(StackError) as err:
        stack_from_data(data)
    assert err.value.problems == [problem]


def test_config_check_prints_the_refusal_and_exits_1(tmp_path):
    for name, text in {
        "env": STACK.read_text().replace(
            "  staging:\n    container", '  "st\\nag":\n    container'
        ),
        "bomb": ALIAS_BOMB,
        "ciphers": STACK.read_text().replace('"HIGH:!aNULL:!MD5"', '"HIGH; }"'),
    }.items():
        path = tmp_path / f"{name}.yml"
        path.write_text(text)
        proc = run_invoke("config.check", "--stack", str(path))
        assert proc.returncode == 1, name
        assert "Traceback" not in proc.stderr
        out = proc.stderr.strip().replace(str(path), "STACK")
        assert (
            out
            == {
                "env": f"error: STACK: 1 problem\n  environments: 'st\\nag': {ENV_RULE}",
                "bomb": "error: STACK:6:8: 1 problem\n  not valid YAML: more than 100000 values "
                "once aliases are expanded (an alias bomb?); write the values out or use fewer "
                "aliases",
                "ciphers": "error: STACK: 1 problem\n  tls.ciphers: 'HIGH; }': an OpenSSL cipher "
                "string is 1-1000 of A-Z a-z 0-9 : + ! @ = _ - (such as HIGH:!aNULL)",
            }[name]
        )


def test_an_impossible_backup_id_is_a_clean_error(state_dir):
    for bad in ("nonsense", "20261399T999999Z-prod-daily", "20260101T020000Z-prod-daily\n"):
        proc = run_invoke("backup.verify", "--id", bad)
        assert proc.returncode == 1
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip() == (
            f"error: {bad!r} is not a backup id (like 20260101T020000Z-prod-daily); "
            "see invoke backup.list"
        )
