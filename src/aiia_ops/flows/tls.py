"""ssl-renew and ssl-status: the stack's ACME certificates on this host (docs/tls.md).

Facts (the installed certificates, nginx's config check, the certbot image, held locks) are
read with `runner.query()`; changes (directories, certbot one-offs, the reload) go through
`runner.run()`. Given a `PrintingRunner(reader=LocalRunner())` the same procedure is the
dry run: what is due is decided from the real host, the commands are printed, and it stops
before anything that would need a certificate to have been issued.

`certificate_status()` is what the monitor and `invoke ssl-status` both read.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from aiia_ops import SERVICES_DIR
from aiia_ops.commands import docker as cmd
from aiia_ops.commands import tls
from aiia_ops.commands.tls import Installed, Lineage
from aiia_ops.errors import OpsError
from aiia_ops.flows.output import paint, table
from aiia_ops.flows.switch import switch_lock
from aiia_ops.host import lock
from aiia_ops.host.files import context_sha
from aiia_ops.host.notify import notify
from aiia_ops.host.releases import audit
from aiia_ops.host.runners import LocalRunner, PrintingRunner, Runner
from aiia_ops.host.signals import interruptible, shielded
from aiia_ops.model import Stack
from aiia_ops.model.state import StateDir
from aiia_ops.model.types import AcmeDirectory

CERTBOT_CONTEXT = SERVICES_DIR / tls.CERTBOT_FOLDER
RENEW_LOCK = "renew"
DEPLOY_WAIT_SECONDS = 600.0
DEPLOY_POLL_SECONDS = 5.0
SERVED_WAIT_SECONDS = 15.0


class RenewFailed(OpsError):
    """Some certificates were not renewed (already reported and notified)."""


def _say(line: str) -> None:
    print(line, flush=True)  # cron's log and a watching person see each step as it happens


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def check_directory(url: str) -> str:
    """--directory goes through the stack value's own rule (tls.acme.directory): it ends up
    in certbot's argv and in the path of its account directory."""
    rule = typing.get_args(AcmeDirectory)[1]
    problem = rule.problem(url) if isinstance(url, str) else f"{url!r}: not a URL"
    if problem:
        raise OpsError(f"--directory {problem}. Nothing was changed")
    return url


def ca_bundle(option: str | None) -> str | None:
    """--ca-bundle, else $AIIA_ACME_CA_BUNDLE: the CAs certbot trusts for the ACME server."""
    path = option or os.environ.get(tls.CA_BUNDLE_ENV) or None
    if path is None:
        return None
    resolved = Path(path).resolve()
    if not resolved.is_file():
        raise OpsError(
            f"the ACME CA bundle {path} (--ca-bundle or ${tls.CA_BUNDLE_ENV}) is not a file"
        )
    return str(resolved)


# --- facts -----------------------------------------------------------------------------------


def read_installed(runner: Runner, state_root: str, lineage: Lineage) -> Installed:
    """Read live/<name>/ on the host: the certificate, the placeholder mark, meta.json."""
    live = PurePosixPath(state_root) / tls.SSL_STATE / lineage.live
    result = runner.query(tls.x509_argv(str(live / "fullchain.pem")), timeout=10)
    if result.code == 127:  # never "no certificate, renew it" every day for want of a tool
        raise OpsError("openssl is not installed on this host: apt-get install openssl")
    if not result.ok:
        missing = "No such file" in result.stderr or "Could not open" in result.stderr
        why = "" if missing else (result.stderr.strip().splitlines() or ["openssl failed"])[-1]
        return Installed(None, error=why)
    try:
        cert = tls.parse_x509(result.stdout)
    except (tls.ParseError, ValueError) as exc:
        return Installed(None, error=str(exc))
    placeholder = runner.read_file(str(live / "PLACEHOLDER")) is not None
    directory = ""
    meta = runner.read_file(str(live / "meta.json"))
    if meta:
        try:
            directory = json.loads(meta).get("directory", "")
        except ValueError:
            directory = ""
    return Installed(cert, placeholder, directory)


def served_serial(runner: Runner, host: str, port: int, domain: str) -> str | None:
    """The serial of the certificate a TLS server presents for `domain`; None if none."""
    result = runner.query(tls.s_client_argv(host, port, domain), input="", timeout=10)
    pem = tls.first_pem(result.stdout)
    if not pem:
        return None
    parsed = runner.query(tls.x509_stdin_argv(), input=pem, timeout=10)
    try:
        return tls.parse_x509(parsed.stdout).serial if parsed.ok else None
    except tls.ParseError:
        return None


def certificate_status(
    stack: Stack,
    state_root: str,
    runner: Runner | None = None,
    now: dt.datetime | None = None,
    served: bool = True,
) -> list[tls.DomainStatus]:
    """The library entry point (the monitor calls this): per domain, issuer, expiry and
    days left of the certificate nginx reads, and the serial nginx actually presents."""
    runner = runner or LocalRunner()
    now = now or dt.datetime.now(dt.UTC)
    installed = {lin.name: read_installed(runner, state_root, lin) for lin in tls.lineages(stack)}
    presented = None
    if served:
        port = stack.local_host.published(443)
        host = tls.connect_host(stack)
        presented = {d: served_serial(runner, host, port, d) or "" for d in tls.all_domains(stack)}
    return tls.domain_statuses(stack, installed, now, presented)


def _running(runner: Runner, container: str) -> bool:
    r = runner.query(cmd.container_running(container))
    return r.ok and r.stdout.strip() == "true"


def decisions(
    runner: Runner, model: Stack, state: StateDir, directory: str, force: bool
) -> list[tls.Decision]:
    now = _now()
    return [
        tls.decide(
            lineage,
            read_installed(runner, str(state.root), lineage),
            now,
            model.tls.acme.renew_before,
            directory,
            force,
        )
        for lineage in tls.lineages(model)
    ]


def plan_table(decisions: list[tls.Decision]) -> str:
    rows = []
    for d in decisions:
        cert = d.installed.cert
        current = f"{cert.issuer_name}, until {cert.not_after:%Y-%m-%d}" if cert else "-"
        rows.append(
            [d.lineage.name, " ".join(d.lineage.domains), current, "renew" if d.due else "keep",
             d.reason]
        )  # fmt: skip
    return table(["certificate", "domains", "current", "action", "why"], rows)


# --- the lock ---------------------------------------------------------------------------------


@contextmanager
def renew_lock(runner: Runner, state: StateDir, out=_say) -> Iterator[None]:
    """One ssl-renew at a time (the `renew` lock: a crashed run's lock is stale and taken
    over, so it never blocks the next day's), and never during a deploy: a second app
    container plus certbot would not fit the memory budget (docs/tls.md)."""
    root = str(state.root)
    try:
        lock.acquire(runner, root, RENEW_LOCK, action="ssl-renew", out=out)
    except lock.LockHeld as exc:
        raise OpsError(f"another ssl-renew is running: {exc}; let it finish, then rerun") from None
    try:
        _wait_for_deploys(runner, root, out)
        yield
    finally:
        lock.release(runner, root, RENEW_LOCK)


def _deploys_held(runner: Runner, root: str) -> list[str]:
    """The deploy locks held by a live holder (a dead one's deploy is not running)."""
    return sorted(
        name
        for name, held in lock.held_locks(runner, root).items()
        if name.startswith("deploy-") and lock.holder_alive(held) is not False
    )


def _wait_for_deploys(runner: Runner, root: str, out) -> None:
    deadline = time.monotonic() + DEPLOY_WAIT_SECONDS
    announced = False
    while held := _deploys_held(runner, root):
        if time.monotonic() > deadline:
            raise OpsError(
                f"a deploy holds {', '.join(held)} for more than "
                f"{DEPLOY_WAIT_SECONDS / 60:.0f} minutes; certificates were not renewed. "
                "Rerun `invoke ssl-renew` after the deploy (or `invoke lock.release` if "
                "it died)"
            )
        if not announced:
            out(f"-> waiting for the deploy to finish ({', '.join(held)}) ...")
            announced = True
        time.sleep(DEPLOY_POLL_SECONDS)


# --- ssl-renew --------------------------------------------------------------------------------


def certbot_image_tag() -> str:
    return tls.certbot_image_tag(context_sha(CERTBOT_CONTEXT))


def ensure_certbot_image(runner: Runner, out=_say) -> str:
    """The certbot image for services/certbot as it is now: built once per change."""
    sha = context_sha(CERTBOT_CONTEXT)
    image = tls.certbot_image(tls.certbot_image_tag(sha))
    if runner.query(cmd.image_inspect(image)).ok:
        return image
    out(f"-> building {image} (Debian's certbot; once per change of services/certbot)")
    runner.run(tls.build_certbot_argv(str(CERTBOT_CONTEXT), sha), timeout=900)
    return image


def prepare_dirs(runner: Runner, state: StateDir) -> None:
    is_root = runner.query(["id", "-u"]).stdout.strip() == "0"
    for argv in tls.prepare_dirs_argv(str(state.root), is_root):
        runner.run(argv)


def renew(
    runner: Runner,
    model: Stack,
    state: StateDir,
    *,
    directory: str,
    bundle: str | None = None,
    force: bool = False,
    out=_say,
) -> dict[str, dict]:
    """Decide, renew what is due, install, reload, report. Returns what was installed;
    raises RenewFailed (after the report) when anything failed."""
    root = str(state.root)
    started = time.monotonic()
    installed: dict[str, dict] = {}
    failed: dict[str, str] = {}
    # A printing runner issues nothing: after the commands, there is nothing to report.
    printing = isinstance(runner, PrintingRunner)
    with interruptible(), renew_lock(runner, state, out):
        if not printing:
            _finish_cut_off(runner, model, state, out)
        decided = decisions(runner, model, state, directory, force)
        out(plan_table(decided))
        due = [d for d in decided if d.due]
        if not due:
            out("\nnothing to renew")
            return installed
        _check_nginx_config(runner, model)
        prepare_dirs(runner, state)
        image = ensure_certbot_image(runner, out)
        for d in due:
            names = ", ".join(d.lineage.domains)
            out(f"-> {d.lineage.name}: requesting {names} from {directory} ...")
            t0 = time.monotonic()
            argv = tls.certbot_argv(model, root, image, d.lineage, directory, bundle)
            result = _one_off(runner, model, argv)
            if not result.ok and tls.account_missing(result.stdout + result.stderr):
                stale = _set_account_aside(runner, state, directory)
                out(f"   the ACME server does not know certbot's account: moved it to {stale}, "
                    "registering anew")  # fmt: skip
                result = _one_off(runner, model, argv)
            if not result.ok:
                failed[d.lineage.name] = tls.certbot_error(result.stdout + "\n" + result.stderr)
                out(paint(f"   failed after {time.monotonic() - t0:.1f}s", "error"))
                continue
            # Recorded before the install runs: a run killed from here on leaves a pair
            # installed (atomically) that nginx has not loaded; the next run reloads it.
            _mark_pending(runner, state, d.lineage.name)
            inst = _one_off(
                runner, model, tls.install_argv(model, root, image, d.lineage, directory)
            )
            if printing:
                continue
            if not inst.ok:
                failed[d.lineage.name] = "issued, but not installed: " + (
                    inst.stderr.strip() or inst.stdout.strip()
                )
                out(paint("   issued but not installed", "error"))
                continue
            try:
                installed[d.lineage.name] = json.loads(inst.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                failed[d.lineage.name] = f"the installer said something unexpected: {inst.stdout!r}"
                continue
            info = installed[d.lineage.name]
            out(
                f"   issued in {time.monotonic() - t0:.1f}s: serial {info['serial']}, until "
                f"{info['not_after']}"
            )
        if printing:
            for argv in cmd.nginx_reload(model):
                runner.run(argv)
            out("\ndry run: nothing was requested or changed")
            return installed
        if installed:
            _reload(runner, model, state, image, installed, failed, out)
        _clear_pending(runner, state)
    took = time.monotonic() - started
    _report(model, state, decided, installed, failed, directory, took, out)
    return installed


def _check_nginx_config(runner: Runner, model: Stack) -> None:
    """Before any ACME traffic: a config nginx refuses would refuse the new certificates
    too, and renewing them every day against it would only spend the CA's rate limits."""
    nginx = model.services.nginx.container
    if not _running(runner, nginx):
        return
    checked = runner.query(cmd.nginx_reload(model)[0])  # `nginx -t` changes nothing
    if not checked.ok:
        raise OpsError(
            f"nginx -t fails in {nginx} before any certificate was requested; fix the config "
            f"first (invoke config.render, docker logs {nginx}):\n"
            + (checked.stderr.strip() or checked.stdout.strip())
        )


def _one_off(runner: Runner, model: Stack, argv: list[str]):
    """Run a certbot one-off. Under the lock no other run can own its container name, so a
    leftover (a run killed mid-way) is removed first, and again after a timeout or a
    signal (killing the docker client does not stop the container)."""
    runner.run(tls.remove_one_off_argv(model), check=False)
    try:
        result = runner.run(argv, check=False, timeout=tls.CERTBOT_TIMEOUT)
    except BaseException:
        with shielded():
            runner.run(tls.remove_one_off_argv(model), check=False)
        raise
    if result.code == 124:
        runner.run(tls.remove_one_off_argv(model), check=False)
        result.stderr += f"\nError: no answer within {tls.CERTBOT_TIMEOUT:.0f}s; stopped"
    return result


# --- a renewal cut off between its install and nginx's reload --------------------------------


def pending_file(state: StateDir) -> str:
    return str(state.sub("journal") / "renew.json")


def _pending(runner: Runner, state: StateDir) -> list[str]:
    data = runner.read_file(pending_file(state))
    try:
        names = json.loads(data).get("pending_reload", []) if data else []
    except ValueError:
        names = ["(unreadable journal)"]
    return [n for n in names if isinstance(n, str)]


def _mark_pending(runner: Runner, state: StateDir, name: str) -> None:
    names = sorted({*_pending(runner, state), name})
    runner.write_file(pending_file(state), json.dumps({"pending_reload": names}) + "\n")


def _clear_pending(runner: Runner, state: StateDir) -> None:
    runner.run(["rm", "-f", pending_file(state)], check=False)


def _finish_cut_off(runner: Runner, model: Stack, state: StateDir, out) -> None:
    """A run killed after installing a pair (each pair goes in atomically: nginx's files
    are always a whole, checked pair) but before nginx reloaded: nginx -t, then the
    graceful reload it missed; a pair nginx refuses goes back to the previous one."""
    names = _pending(runner, state)
    if not names:
        return
    nginx = model.services.nginx.container
    out(f"-> a renewal was cut off after installing {', '.join(names)}: nginx reloads it now")
    if _running(runner, nginx):
        test, reload = cmd.nginx_reload(model)
        with switch_lock(runner, str(state.root), out):  # host-wide: no deploy's reload between
            checked = runner.run(test, check=False)
            if checked.ok:
                runner.run(reload)
        if not checked.ok:
            image = ensure_certbot_image(runner, out)
            by_name = {lin.name: lin for lin in tls.lineages(model)}
            for name in names:
                if name in by_name:
                    _one_off(runner, model, tls.rollback_argv(model, str(state.root), image,
                                                              by_name[name]))  # fmt: skip
            out(paint("   nginx -t refused it: the previous certificate is back", "error"))
    _clear_pending(runner, state)


def _set_account_aside(runner: Runner, state: StateDir, directory: str) -> Path:
    path = state.sub(tls.LE_STATE) / tls.account_dir(directory)
    stale = path.with_name(f"{path.name}.stale-{_now():%Y%m%dT%H%M%SZ}")
    if runner.query(["test", "-e", str(path)]).ok:
        runner.run(["mv", str(path), str(stale)])
    return stale


def _wait_served(runner: Runner, model: Stack, expected: dict[str, str]) -> dict[str, str | None]:
    """After a reload new workers take over within moments: poll until every renewed name
    is presented with its new serial (or the time is up)."""
    port = model.local_host.published(443)
    deadline = time.monotonic() + SERVED_WAIT_SECONDS
    while True:
        seen = {d: served_serial(runner, tls.connect_host(model), port, d) for d in expected}
        if all(tls.same_serial(seen[d], s) for d, s in expected.items()):
            return seen
        if time.monotonic() > deadline:
            return seen
        time.sleep(0.5)


def _reload(runner, model, state, image, installed, failed, out) -> None:
    nginx = model.services.nginx.container
    if not _running(runner, nginx):
        out(f"-> {nginx} is not running: it reads the new certificates when it starts")
        return
    test, reload = cmd.nginx_reload(model)
    # The check and the reload under the host-wide switch lock (flows/switch.py): no deploy
    # renders and reloads nginx in between.
    with switch_lock(runner, str(state.root), out):
        checked = runner.run(test, check=False)
        if checked.ok:
            out("-> nginx -t ok; reloading gracefully")
            runner.run(reload)
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


def _report(model, state, decided, installed, failed, directory, took, out) -> None:
    rows = []
    for d in decided:
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
    out("")
    out(table(["certificate", "result", "serial", "expires"], rows))
    out(f"\n{len(installed)} renewed, {len(failed)} failed in {took:.1f}s ({directory})")
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


def ssl_renew(
    model: Stack,
    state: StateDir,
    *,
    directory: str,
    bundle: str | None,
    force: bool,
    dry_run: bool,
    out=_say,
) -> None:
    """`invoke ssl-renew`: the real host, or its facts with every change printed."""
    started = time.monotonic()
    check_directory(directory)
    real = LocalRunner()
    runner = PrintingRunner(reader=real) if dry_run else real
    out(f"ssl-renew {_now():%Y-%m-%dT%H:%M:%SZ}: ACME directory {directory}")
    try:
        renew(runner, model, state, directory=directory, bundle=bundle, force=force, out=out)
    except RenewFailed:
        raise
    except OpsError as exc:  # refused before or between renewals: cron must hear of it too
        if not dry_run:
            notify(f":warning: ssl-renew failed ({directory}): {exc}", state.root)
        raise
    out(f"done in {time.monotonic() - started:.1f}s")
