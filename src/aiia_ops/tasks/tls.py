"""invoke ssl-renew | ssl-status: the stack's ACME certificates (docs/tls.md).

`ssl-renew` is what the host's daily cron job runs, as is: non-interactive, one run at a
time (a lock the kernel releases if the run dies), quiet exit 0 when nothing is due,
exit 1 with the ACME server's own error when something failed (the certificates in place
stay, nginx keeps serving them), an audit line and a Slack message when anything changed
or failed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import time
from pathlib import Path

from aiia_ops import SERVICES_DIR
from aiia_ops.commands import docker as cmd
from aiia_ops.commands import tls
from aiia_ops.commands.argv import quote
from aiia_ops.commands.facts import context_sha
from aiia_ops.errors import OpsError
from aiia_ops.flows.output import paint, table
from aiia_ops.host.notify import notify
from aiia_ops.host.releases import audit
from aiia_ops.host.runners import LocalRunner, Runner
from aiia_ops.model import Stack, load_stack
from aiia_ops.model.state import StateDir, local_state_dir
from aiia_ops.tasks.common import task

CERTBOT_CONTEXT = SERVICES_DIR / tls.CERTBOT_FOLDER
CONTEXT_LABEL = "org.aiia.context-sha256"
DEPLOY_WAIT_SECONDS = 600.0
SERVED_WAIT_SECONDS = 15.0


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --- the certbot image ---------------------------------------------------------------------


def certbot_image_tag() -> str:
    """Tagged by its build context: rebuilt only when services/certbot changes."""
    return f"ctx-{context_sha(CERTBOT_CONTEXT)[:12]}"


def build_certbot_argv(tag: str) -> list[str]:
    return [
        "docker", "build", "--quiet",
        "--label", f"{CONTEXT_LABEL}={context_sha(CERTBOT_CONTEXT)}",
        "--tag", tls.certbot_image(tag), "--tag", tls.certbot_image("latest"),
        str(CERTBOT_CONTEXT),
    ]  # fmt: skip


def ensure_certbot_image(runner: Runner) -> str:
    image = tls.certbot_image(certbot_image_tag())
    if runner.run(["docker", "image", "inspect", image], check=False).ok:
        return image
    print(f"-> building {image} (Debian's certbot; once per change of services/certbot)")
    runner.run(build_certbot_argv(certbot_image_tag()), timeout=900)
    return image


# --- locks and directories -----------------------------------------------------------------


@contextlib.contextmanager
def renew_lock(state: StateDir):
    """One ssl-renew at a time (flock: released by the kernel if the run dies, so a crashed
    cron run never blocks the next day's), and never during a deploy: a second app
    container plus certbot would not fit the memory budget (docs/tls.md)."""
    locks = state.sub("locks")
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / "ssl-renew.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OpsError(
                "another ssl-renew is running (lock "
                f"{locks / 'ssl-renew.lock'}); let it finish, then rerun"
            ) from None
        deadline = time.monotonic() + DEPLOY_WAIT_SECONDS
        announced = False
        while held := sorted(p.name for p in locks.glob("deploy-*") if p.is_dir()):
            if time.monotonic() > deadline:
                raise OpsError(
                    f"a deploy holds {', '.join(held)} for more than "
                    f"{DEPLOY_WAIT_SECONDS / 60:.0f} minutes; certificates were not renewed. "
                    "Rerun `invoke ssl-renew` after the deploy (or `invoke lock.release` if "
                    "it died)"
                )
            if not announced:
                print(f"-> waiting for the deploy to finish ({', '.join(held)}) ...", flush=True)
                announced = True
            time.sleep(5)
        yield


def prepare_dirs(state: StateDir) -> None:
    """certbot (UID 10001 in its container) writes its config dir, the webroot and nginx's
    ssl dir; its own config dir (account key, private keys) is private."""
    for rel, mode in ((tls.LE_STATE, 0o700), (tls.ACME_STATE, 0o755), (tls.SSL_STATE, 0o755)):
        path = state.sub(rel)
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            for sub in (path, *path.rglob("*")) if rel == tls.LE_STATE else (path,):
                os.lchown(sub, tls.CERTBOT_UID, tls.CERTBOT_UID)
        if rel == tls.LE_STATE:
            os.chmod(path, mode)


# --- ssl-renew -----------------------------------------------------------------------------


def _ca_bundle(option: str | None) -> str | None:
    path = option or os.environ.get(tls.CA_BUNDLE_ENV) or None
    if path is None:
        return None
    resolved = Path(path).resolve()
    if not resolved.is_file():
        raise OpsError(
            f"the ACME CA bundle {path} (--ca-bundle or ${tls.CA_BUNDLE_ENV}) is not a file"
        )
    return str(resolved)


def _decisions(runner, model: Stack, state: StateDir, directory: str, force: bool):
    now = _now()
    return [
        tls.decide(
            lineage,
            tls.read_installed(runner, str(state.root), lineage),
            now,
            model.tls.acme.renew_before,
            directory,
            force,
        )
        for lineage in tls.lineages(model)
    ]


def _plan_table(decisions: list[tls.Decision]) -> str:
    rows = []
    for d in decisions:
        cert = d.installed.cert
        current = f"{cert.issuer_name}, until {cert.not_after:%Y-%m-%d}" if cert else "-"
        rows.append(
            [d.lineage.name, " ".join(d.lineage.domains), current, "renew" if d.due else "keep",
             d.reason]
        )  # fmt: skip
    return table(["certificate", "domains", "current", "action", "why"], rows)


def _running(runner: Runner, container: str) -> bool:
    r = runner.run(["docker", "inspect", "--format", "{{.State.Running}}", container], check=False)
    return r.ok and r.stdout.strip() == "true"


def _wait_served(runner: Runner, model: Stack, expected: dict[str, str]) -> dict[str, str | None]:
    """After a reload new workers take over within moments: poll until every renewed name
    is presented with its new serial (or the time is up)."""
    port = model.local_host.published(443)
    deadline = time.monotonic() + SERVED_WAIT_SECONDS
    seen: dict[str, str | None] = {}
    while True:
        seen = {d: tls.served_serial(runner, tls.connect_host(model), port, d) for d in expected}
        if all(tls.same_serial(seen[d], s) for d, s in expected.items()):
            return seen
        if time.monotonic() > deadline:
            return seen
        time.sleep(0.5)


@task(
    help={
        "force": "renew every certificate now, due or not",
        "dry_run": "print what is due and the exact commands; contact no ACME server, change "
        "nothing",
        "directory": "ACME directory URL for this run (default: the stack's tls.acme.directory)",
        "ca_bundle": "PEM file of CAs to trust for the ACME server "
        f"(default: ${tls.CA_BUNDLE_ENV})",
    }
)
def ssl_renew(c, force=False, dry_run=False, directory=None, ca_bundle=None, stack=None):
    """Renew the certificates that are due (<= tls.acme.renew_before left), then reload nginx."""
    started = time.monotonic()
    model = load_stack(stack)
    state = local_state_dir(model)
    root = str(state.root)
    directory = directory or model.tls.acme.directory
    bundle = _ca_bundle(ca_bundle)
    runner = LocalRunner()

    if dry_run:
        decisions = _decisions(runner, model, state, directory, force)
        print(_plan_table(decisions))
        due = [d for d in decisions if d.due]
        if not due:
            print("\nnothing is due: no command would run")
            return
        image = tls.certbot_image(certbot_image_tag())
        print(f"\nwould run (ACME directory {directory}):")
        for d in due:
            for argv in (
                tls.certbot_argv(model, root, image, d.lineage, directory, bundle),
                tls.install_argv(model, root, image, d.lineage, directory),
            ):
                print(f"  $ {quote(argv)}")
        for argv in cmd.nginx_reload(model):
            print(f"  $ {quote(argv)}")
        return

    print(f"ssl-renew {_now():%Y-%m-%dT%H:%M:%SZ}: ACME directory {directory}", flush=True)
    try:
        renew(runner, model, state, directory=directory, bundle=bundle, force=force)
    except RenewFailed:
        raise
    except OpsError as exc:  # refused before or between renewals: cron must hear of it too
        notify(f":warning: ssl-renew failed ({directory}): {exc}", state.root)
        raise
    print(f"done in {time.monotonic() - started:.1f}s")


class RenewFailed(OpsError):
    """Some certificates were not renewed (already reported and notified)."""


def renew(
    runner: Runner,
    model: Stack,
    state: StateDir,
    *,
    directory: str,
    bundle: str | None = None,
    force: bool = False,
) -> dict[str, dict]:
    """Decide, renew what is due, install, reload, report. Returns what was installed;
    raises RenewFailed (after the report) when anything failed."""
    root = str(state.root)
    started = time.monotonic()
    installed: dict[str, dict] = {}
    failed: dict[str, str] = {}
    with renew_lock(state):
        decisions = _decisions(runner, model, state, directory, force)
        print(_plan_table(decisions), flush=True)
        due = [d for d in decisions if d.due]
        if not due:
            print("\nnothing to renew")
            return installed
        _check_nginx_config(runner, model)
        prepare_dirs(state)
        image = ensure_certbot_image(runner)
        for d in due:
            names = ", ".join(d.lineage.domains)
            print(f"-> {d.lineage.name}: requesting {names} from {directory} ...", flush=True)
            t0 = time.monotonic()
            argv = tls.certbot_argv(model, root, image, d.lineage, directory, bundle)
            result = _one_off(runner, model, argv)
            if not result.ok and tls.account_missing(result.stdout + result.stderr):
                stale = _set_account_aside(state, directory)
                print(f"   the ACME server does not know certbot's account: moved it to {stale}, "
                      "registering anew", flush=True)  # fmt: skip
                result = _one_off(runner, model, argv)
            if not result.ok:
                failed[d.lineage.name] = tls.certbot_error(result.stdout + "\n" + result.stderr)
                print(paint(f"   failed after {time.monotonic() - t0:.1f}s", "error"), flush=True)
                continue
            inst = _one_off(
                runner, model, tls.install_argv(model, root, image, d.lineage, directory)
            )
            if not inst.ok:
                failed[d.lineage.name] = "issued, but not installed: " + (
                    inst.stderr.strip() or inst.stdout.strip()
                )
                print(paint("   issued but not installed", "error"), flush=True)
                continue
            try:
                installed[d.lineage.name] = json.loads(inst.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                failed[d.lineage.name] = f"the installer said something unexpected: {inst.stdout!r}"
                continue
            print(
                f"   issued in {time.monotonic() - t0:.1f}s: serial "
                f"{installed[d.lineage.name]['serial']}, until "
                f"{installed[d.lineage.name]['not_after']}",
                flush=True,
            )
        if installed:
            _reload(runner, model, state, image, installed, failed)
    took = time.monotonic() - started
    _report(model, state, decisions, installed, failed, directory, took)
    return installed


def _check_nginx_config(runner: Runner, model: Stack) -> None:
    """Before any ACME traffic: a config nginx refuses would refuse the new certificates
    too, and renewing them every day against it would only spend the CA's rate limits."""
    nginx = model.services.nginx.container
    if not _running(runner, nginx):
        return
    checked = runner.run(cmd.nginx_reload(model)[0], check=False)
    if not checked.ok:
        raise OpsError(
            f"nginx -t fails in {nginx} before any certificate was requested; fix the config "
            f"first (invoke config.render, docker logs {nginx}):\n"
            + (checked.stderr.strip() or checked.stdout.strip())
        )


def _one_off(runner: Runner, model: Stack, argv: list[str]):
    """Run a certbot one-off. Under the lock no other run can own its container name, so a
    leftover (a run killed mid-way) is removed first, and again after a timeout (killing
    the docker client does not stop the container)."""
    name = tls.container_name(model)
    runner.run(["docker", "rm", "--force", name], check=False)
    result = runner.run(argv, check=False, timeout=tls.CERTBOT_TIMEOUT)
    if result.code == 124:
        runner.run(["docker", "rm", "--force", name], check=False)
        result.stderr += f"\nError: no answer within {tls.CERTBOT_TIMEOUT:.0f}s; stopped"
    return result


def _set_account_aside(state: StateDir, directory: str) -> Path:
    path = state.sub(tls.LE_STATE) / tls.account_dir(directory)
    stale = path.with_name(f"{path.name}.stale-{_now():%Y%m%dT%H%M%SZ}")
    if path.exists():
        path.rename(stale)
    return stale


def _reload(runner, model, state, image, installed, failed) -> None:
    nginx = model.services.nginx.container
    if not _running(runner, nginx):
        print(f"-> {nginx} is not running: it reads the new certificates when it starts")
        return
    test, reload = cmd.nginx_reload(model)
    checked = runner.run(test, check=False)
    if not checked.ok:
        # Never leave a pair nginx refuses where its next start would read it.
        by_name = {lin.name: lin for lin in tls.lineages(model)}
        for name in list(installed):
            _one_off(runner, model, tls.rollback_argv(model, str(state.root), image, by_name[name]))
            failed[name] = "nginx -t refused the new certificate (rolled back): " + (
                checked.stderr.strip() or checked.stdout.strip()
            )
            del installed[name]
        return
    print("-> nginx -t ok; reloading gracefully", flush=True)
    runner.run(reload)
    expected = {
        domain: info["serial"]
        for info in installed.values()
        for domain in info.get("domains", [])
        if domain in tls.all_domains(model)
    }
    seen = _wait_served(runner, model, expected)
    stale = sorted(d for d, s in expected.items() if not tls.same_serial(seen.get(d), s))
    if stale:
        for name, info in list(installed.items()):
            if any(d in stale for d in info.get("domains", [])):
                del installed[name]
                failed[name] = (
                    f"installed, but after the reload nginx still presents serial "
                    f"{seen.get(info['domains'][0])} for {', '.join(stale)}; see "
                    f"`docker logs {model.services.nginx.container}`"
                )


def _report(model, state, decisions, installed, failed, directory, took) -> None:
    rows = []
    for d in decisions:
        name = d.lineage.name
        if name in installed:
            info = installed[name]
            rows.append([name, "renewed", info["serial"], info["not_after"][:10]])
        elif name in failed:
            rows.append([name, "FAILED", "-", "-"])
        else:
            cert = d.installed.cert
            rows.append([name, "kept", cert.serial if cert else "-",
                         f"{cert.not_after:%Y-%m-%d}" if cert else "-"])  # fmt: skip
    print()
    print(table(["certificate", "result", "serial", "expires"], rows))
    print(f"\n{len(installed)} renewed, {len(failed)} failed in {took:.1f}s ({directory})")
    parts = [f"{n} renewed until {i['not_after'][:10]}" for n, i in installed.items()]
    parts += [f"{n} FAILED" for n in failed]
    if parts:
        audit(state.root, "ssl-renew: " + "; ".join(parts))
    if failed:
        details = "\n".join(
            f"  {name}:\n" + "\n".join(f"    {line}" for line in why.splitlines())
            for name, why in failed.items()
        )
        notify(
            f":warning: ssl-renew failed for {', '.join(failed)} ({directory}); the current "
            "certificates stay in place.\n" + details,
            state.root,
        )
        raise RenewFailed(
            f"ssl-renew: {len(failed)} of {len(failed) + len(installed)} certificate(s) not "
            "renewed; the certificates in place stay and nginx keeps serving them. "
            f"The ACME server ({directory}) said:\n{details}\n"
            f"certbot's log: {state.sub(tls.LE_STATE) / 'logs' / 'letsencrypt.log'}"
        )
    if installed:
        notify(":lock: ssl-renew: " + "; ".join(parts), state.root)


# --- ssl-status ----------------------------------------------------------------------------


@task(
    help={
        "json": "print JSON for machines (the monitor reads the same data from "
        "aiia_ops.commands.tls.certificate_status)",
        "served": "also ask nginx which certificate it presents for each name (default on)",
    }
)
def ssl_status(c, json_=False, served=True, stack=None):
    """Per domain: issuer, expiry date and days left of its certificate."""
    model = load_stack(stack)
    state = local_state_dir(model)
    rows = tls.certificate_status(model, str(state.root), served=served)
    if json_:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return
    print(table(tls.STATUS_HEADERS, tls.status_table_rows(rows)))
