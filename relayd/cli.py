"""The `relayd` command line. Every subcommand that needs the config takes --config."""

from __future__ import annotations

import argparse
import asyncio
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiormq
import orjson
import structlog
import uvloop

import relayd
from relayd import (
    admin,
    amqp,
    config,
    gdpr,
    keys,
    log,
    metrics,
    payload,
    provision,
    retention,
    status,
    topology,
)
from relayd.completion import bash_completion
from relayd.crypto import Kem, b64d, ed25519_public, fingerprint
from relayd.errors import ConfigError, ExitCode, StoreUnavailableError, TransientError
from relayd.sdnotify import Notifier
from relayd.store import Business, Device, Store, open_backend, open_store, open_vault
from relayd.worker import ROLES, Role

DEFAULT_CONFIG = "/etc/relayd/relayd.yaml"
T = TypeVar("T")


def _run(main: Coroutine[Any, Any, T], runner: Callable[..., Any] = asyncio.run) -> T:
    """Run `main` on a new event loop whose exception handler logs types and frames only
    (relayd.log.on_loop_exception): every relayd process starts its loop here."""
    async def guarded() -> T:
        log.guard_loop()
        return await main

    result: T = runner(guarded())
    return result


def _print(args: argparse.Namespace, data: Any, human: str) -> None:
    print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() if args.json else human)


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return "(none)"
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(str(r[c]).ljust(w) for c, w in zip(columns, widths, strict=True))
              for r in rows]
    return "\n".join(lines)


def cmd_check_config(args: argparse.Namespace, settings: config.Settings) -> int:
    print(f"{args.config}: ok")
    return ExitCode.OK


def cmd_keys_generate(args: argparse.Namespace, settings: config.Settings) -> int:
    written = keys.generate(settings.keys.dir, args.kid, Kem(args.kem))
    print("\n".join(f"wrote {settings.keys.dir / name}" for name in written)
          or "every key exists already: nothing written")
    return ExitCode.OK


def _keyring(settings: config.Settings) -> keys.KeyRing:
    return keys.from_settings(settings.keys)


async def _store(settings: config.Settings, migrate: bool = True) -> Store:
    """The store, its ids pseudonymised under the relay's opaque secret."""
    return await open_store(settings.store.url, secret=_keyring(settings).opaque_secret,
                            key_vault=settings.store.key_vault, migrate=migrate,
                            settings=settings)


def cmd_keys_show(args: argparse.Namespace, settings: config.Settings) -> int:
    print(orjson.dumps(_keyring(settings).public_info()).decode())
    return ExitCode.OK


def cmd_run(args: argparse.Namespace, settings: config.Settings) -> int:
    from relayd.supervisor import Supervisor

    roles: list[Role] = [args.role]
    if args.role == "all":
        roles = ["inbound", "outbound"]
        roles += ["gdpr"] if settings.gdpr.identity_user else []
        roles += ["edge"] if settings.workers.edge else []
        roles += ["retention"] if settings.retention.enabled else []
    if "edge" in roles:
        config.require_edge(settings)
    structlog.contextvars.bind_contextvars(worker="supervisor")
    return _run(Supervisor(settings, Path(args.config), roles).run())


def cmd_worker(args: argparse.Namespace, settings: config.Settings) -> int:
    from relayd.worker import work

    structlog.contextvars.bind_contextvars(worker=args.name or args.role)
    metrics.at_zero(args.role)
    return _run(work(settings, Path(args.config), args.role, args.control_fd, args.name),
                uvloop.run)


def cmd_edge(args: argparse.Namespace, settings: config.Settings) -> int:
    """One edge process in the foreground: the edge role of `relayd run`, unsupervised."""
    from relayd.worker import work

    structlog.contextvars.bind_contextvars(worker="edge")
    metrics.at_zero("edge")
    return _run(work(settings, Path(args.config), "edge"), uvloop.run)


def cmd_status(args: argparse.Namespace, settings: config.Settings) -> int:
    report = _run(status.gather(settings))
    _print(args, report, status.render(report))
    running = report["supervisor"] is not None and report["supervisor"]["ready"]
    return ExitCode.OK if running else ExitCode.FAILURE


def cmd_topology_declare(args: argparse.Namespace, settings: config.Settings) -> int:
    secret = _keyring(settings).opaque_secret

    async def declare() -> int:
        store = await _store(settings)
        try:
            return await admin.declare_all(settings, store, secret)
        finally:
            await store.close()

    declared = _run(declare())
    _print(args, {"declared": declared}, f"declared {declared} exchanges, queues and bindings")
    return ExitCode.OK


def cmd_topology_move(args: argparse.Namespace, settings: config.Settings) -> int:
    secret = _keyring(settings).opaque_secret
    inboxes = args.action == "move-business-inboxes"
    mover = admin.move_legacy_business_inboxes if inboxes else admin.move_legacy_device_queues

    async def move() -> admin.Moved:
        store = await _store(settings)
        try:
            await admin.declare_all(settings, store, secret)
            return await mover(settings, store, secret)
        finally:
            await store.close()

    moved = _run(move())
    kind = "business inboxes" if inboxes else "device queues"
    result = {"queues": moved.queues, "messages": moved.messages}
    human = (f"moved {moved.messages} messages out of {moved.queues} {kind} of the old "
             "names, and deleted those")
    if moved.in_use:
        result["in_use"] = moved.in_use
        human += (f"\n{moved.in_use} emptied but still consumed, left in place: stop their "
                  "consumers and run this again")
    _print(args, result, human)
    return ExitCode.FAILURE if moved.in_use else ExitCode.OK


def cmd_store_migrate(args: argparse.Namespace, settings: config.Settings) -> int:
    async def migrate() -> tuple[int, int]:
        store = await _store(settings, migrate=False)
        try:
            return await store.migrate()
        finally:
            await store.close()

    before, now = _run(migrate())
    _print(args, {"before": before, "now": now},
           f"schema at version {now}" + (f" (was {before})" if before != now else ": up to date"))
    return ExitCode.OK


def cmd_store_move_keys(args: argparse.Namespace, settings: config.Settings) -> int:
    from relayd.store.pseudonym import move_keys

    if settings.store.key_vault is None:
        print("store.key_vault must name where the keys go (amqp, or sqlite:///PATH)",
              file=sys.stderr)
        return ExitCode.USAGE

    async def move() -> tuple[int, int]:
        source = await open_backend(settings.store.url)
        try:
            vault = await open_vault(str(settings.store.key_vault), settings)
            try:
                return await move_keys(source, vault)
            finally:
                await vault.close()
        finally:
            await source.close()

    moved, refused = _run(move())
    human = f"moved {moved} user keys out of the store into the key vault"
    if refused:
        human += (f"\n{refused} left in the store: the vault holds other keys for them "
                  "(two stores sharing one vault?)")
    _print(args, {"moved": moved, "refused": refused}, human)
    return ExitCode.FAILURE if refused else ExitCode.OK


async def _watchdog(notifier: Notifier) -> None:
    """WATCHDOG=1 at half of systemd's WatchdogSec, for as long as the event loop runs."""
    if notifier.watchdog_s is None:
        return
    while True:
        notifier.watchdog()
        await asyncio.sleep(notifier.watchdog_s)


def cmd_vault(args: argparse.Namespace, settings: config.Settings) -> int:
    """The key vault service in the foreground, until SIGTERM or SIGINT; with --create,
    make vault.file once, and exit. The service never makes the file itself: one started
    on a host without it (a second host's standby, a lost disk) would answer every host
    that no user has a key, and every user would read as erased."""
    from relayd import vault
    from relayd.store.sqlite import SqliteStore

    if args.create:
        if settings.vault.file.exists():
            print(f"{settings.vault.file} exists: nothing to do")
            return ExitCode.OK
        _run(SqliteStore(settings.vault.file).close())
        print(f"created {settings.vault.file}: back it up (docs/operations.md)")
        return ExitCode.OK
    if not settings.vault.file.exists():
        print(f"vault.file: {settings.vault.file} does not exist. Restore it from its"
              " backup; for a new deployment only, run `relayd vault --create` once",
              file=sys.stderr)
        return ExitCode.CONFIG

    async def serve() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        notifier = Notifier()
        watchdog = asyncio.create_task(_watchdog(notifier))
        try:
            await vault.serve(settings, stop, notifier=notifier)
        finally:
            watchdog.cancel()
        return ExitCode.OK

    structlog.contextvars.bind_contextvars(worker="vault")
    return _run(serve())


def cmd_store_copy(args: argparse.Namespace, settings: config.Settings) -> int:
    from relayd.store.copy import CopyRefusedError, copy_sqlite
    from relayd.store.postgres import PostgresStore

    if not args.source.startswith("sqlite:///"):
        print("--from must be a sqlite:/// URL", file=sys.stderr)
        return ExitCode.USAGE
    if settings.store.url.startswith("sqlite:///"):
        print("store.url must name the PostgreSQL store to copy into", file=sys.stderr)
        return ExitCode.USAGE

    source = Path(args.source.removeprefix("sqlite:///"))
    if not source.is_file():
        print(f"{source}: no such file", file=sys.stderr)
        return ExitCode.NOT_FOUND

    async def copy() -> dict[str, int]:
        secret = _keyring(settings).opaque_secret
        await (await open_store(args.source, secret=secret)).close()  # ids as pseudonyms
        target = await PostgresStore.connect(settings.store.url)
        vault = None if settings.store.key_vault is None else await open_vault(
            settings.store.key_vault, settings)
        try:
            return await copy_sqlite(source, target, args.force, vault)
        finally:
            await target.close()
            if vault is not None:
                await vault.close()

    try:
        copied = _run(copy())
    except CopyRefusedError as exc:
        print(f"not copied: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    _print(args, copied, "\n".join(f"{table}: {rows} rows" for table, rows in copied.items()))
    return ExitCode.OK


def cmd_completion(args: argparse.Namespace) -> int:
    print(bash_completion(parser()), end="")
    return ExitCode.OK


def _valid_id(pattern: Any, value: str, what: str) -> str:
    if not pattern.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{what} must match {pattern.pattern}")
    return value


def _hand_over(args: argparse.Namespace, password: str | None, result: dict[str, Any],
               lines: list[str]) -> int:
    """Give a new password to the operator once: into --password-file (mode 0600), or
    printed."""
    if password is not None and args.password_file is not None:
        try:
            provision.write_secret(args.password_file, password)
        except OSError as exc:
            print(f"could not write {args.password_file}: {exc.strerror}; the password is "
                  "set but lost: run business rotate-credentials", file=sys.stderr)
            return ExitCode.FAILURE
        result["password_file"] = str(args.password_file)
        lines.append(f"password written to {args.password_file} (mode 0600)")
    elif password is not None:
        result["password"] = password
        lines.append(f"password (shown once): {password}")
    _print(args, result, "\n".join(lines))
    return ExitCode.OK


async def _business_add(args: argparse.Namespace, settings: config.Settings,
                        store: Store) -> int:
    secret = _keyring(settings).opaque_secret  # it names the business's inbox
    business = Business(args.id, args.amqp_user, args.first_party)
    existing = await store.business(args.id)
    if existing is not None and existing != business:
        print(f"business {args.id} exists with other settings: remove it first", file=sys.stderr)
        return ExitCode.FAILURE
    holder = await store.business_by_amqp_user(args.amqp_user)
    if holder is not None and holder.id != args.id:
        print(f"RabbitMQ user {args.amqp_user} belongs to business {holder.id}", file=sys.stderr)
        return ExitCode.FAILURE
    done = await admin.add_business(settings, store, business, secret, args.auth)
    inbox = topology.business_inbox(settings.topology, args.id, secret)
    lines = [f"business {args.id}: {'added' if done.added else 'already registered'}",
             f"its inbox (hand it to the business with its credentials): {inbox}"]
    if settings.amqp.management is not None:
        changed = ", ".join(done.provisioned) + " set" if done.provisioned else "unchanged"
        lines.append(f"RabbitMQ user {args.amqp_user}: {changed}")
    return _hand_over(args, done.password, {"business": args.id, "added": done.added,
                                            "inbox": inbox, "provisioned": done.provisioned},
                      lines)


async def _business_remove(args: argparse.Namespace, settings: config.Settings,
                           store: Store) -> int:
    secret = _keyring(settings).opaque_secret
    gone = await admin.remove_business(settings, store, args.id, secret)
    human = f"business {args.id}: {'removed' if gone.removed else 'was not registered'}"
    if gone.user != "unmanaged":
        human += (f"\nRabbitMQ user: {gone.user.replace('_', ' ')}, "
                  f"{gone.connections_closed} connection(s) closed")
    _print(args, {"business": args.id, "removed": gone.removed, "user": gone.user,
                  "connections_closed": gone.connections_closed}, human)
    return ExitCode.OK if gone.removed or gone.user == "deleted" else ExitCode.NOT_FOUND


async def _business_rotate(args: argparse.Namespace, settings: config.Settings,
                           store: Store) -> int:
    password = await admin.rotate_credentials(settings, store, args.id)
    if password is None:
        print(f"business {args.id} is not registered", file=sys.stderr)
        return ExitCode.NOT_FOUND
    return _hand_over(args, password, {"business": args.id, "rotated": True},
                      [f"business {args.id}: new password issued, open connections closed"])


async def _business_list(args: argparse.Namespace, settings: config.Settings,
                         store: Store) -> int:
    secret = _keyring(settings).opaque_secret
    rows = [{"id": b.id, "amqp_user": b.amqp_user, "first_party": b.first_party,
             "inbox": topology.business_inbox(settings.topology, b.id, secret)}
            for b in await store.businesses()]
    _print(args, rows, _table(rows, ["id", "amqp_user", "first_party", "inbox"]))
    return ExitCode.OK


_BUSINESS_ACTIONS = {"add": _business_add, "remove": _business_remove,
                     "rotate-credentials": _business_rotate, "list": _business_list}


def cmd_business(args: argparse.Namespace, settings: config.Settings) -> int:
    if settings.amqp.management is None and (getattr(args, "auth", None)
                                             or getattr(args, "password_file", None)):
        print("--auth and --password-file need amqp.management in the config", file=sys.stderr)
        return ExitCode.USAGE

    async def act() -> int:
        store = await _store(settings)
        try:
            return await _BUSINESS_ACTIONS[args.action](args, settings, store)
        except provision.ProvisionError as exc:
            print(f"business {args.id}: {exc}", file=sys.stderr)
            return ExitCode.FAILURE
        finally:
            await store.close()

    return _run(act())


def _device(args: argparse.Namespace) -> Device:
    """The device the arguments describe; ValueError if a key does not decode."""
    kem = Kem(args.kem)
    enc, sign = b64d(args.enc_key), b64d(args.sign_key)
    try:
        kem.public_key(enc)
    except ValueError as exc:
        raise ValueError(f"--enc-key: {exc}") from None
    try:
        ed25519_public(sign)
    except ValueError as exc:
        raise ValueError(f"--sign-key: {exc}") from None
    return Device(args.device, args.user, kem, enc, sign)


def cmd_device(args: argparse.Namespace, settings: config.Settings) -> int:
    try:
        device = _device(args) if args.action == "add" else None
    except ValueError as exc:
        print(f"bad key: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    secret = _keyring(settings).opaque_secret  # it names the device queues
    t = settings.topology

    async def act() -> int:
        store = await _store(settings)
        try:
            if device is not None:
                existing = await store.device(args.device)
                if existing is not None and existing != device:
                    print(f"device {args.device} exists with other keys: remove it first",
                          file=sys.stderr)
                    return ExitCode.FAILURE
                added = await admin.add_device(settings, store, device, secret)
                queue = topology.device_queue(t, args.device, secret)
                _print(args, {"device": args.device, "added": added, "queue": queue},
                       f"device {args.device}: {'added' if added else 'already registered'}"
                       f"\nits queue (for the edge or the device): {queue}")
            elif args.action == "remove":
                removed = await admin.remove_device(settings, store, args.device, secret)
                _print(args, {"device": args.device, "removed": removed},
                       f"device {args.device}: {'removed' if removed else 'was not registered'}")
                return ExitCode.OK if removed else ExitCode.NOT_FOUND
            else:
                rows = [{"device": d.id, "user": d.user, "kem": d.kem.value,
                         "enc_key": fingerprint(d.enc_key), "sign_key": fingerprint(d.sign_key),
                         "queue": topology.device_queue(t, d.id, secret)}
                        for d in await store.devices()
                        if args.user is None or d.user == args.user]
                _print(args, rows, _table(rows, ["device", "user", "kem", "enc_key", "sign_key",
                                                 "queue"]))
            return ExitCode.OK
        finally:
            await store.close()

    return _run(act())


def cmd_gdpr(args: argparse.Namespace, settings: config.Settings) -> int:
    async def act() -> int:
        store = await _store(settings)
        try:
            if args.action == "export":
                print(orjson.dumps(await gdpr.export(store, args.user),
                                   option=orjson.OPT_INDENT_2).decode())
            elif args.action == "audit":
                rows = [{"at": _iso(r.at_ms), "action": r.action, "subject": r.subject,
                         "detail": r.detail} for r in await store.audit_log()]
                _print(args, rows, _table(
                    [{**row, "detail": orjson.dumps(row["detail"]).decode()} for row in rows],
                    ["at", "action", "subject", "detail"]))
            else:
                keyring = _keyring(settings)
                async with amqp.publisher(settings, "relayd-gdpr", keyring.opaque_secret) as sink:
                    try:
                        if args.action == "erase":
                            counts = await gdpr.erase(store, keyring, sink, args.user,
                                                      via="cli")
                        else:
                            counts = await retention.enforce(settings, store, keyring, sink,
                                                             time.time_ns() // 1_000_000)
                    except TransientError as exc:
                        print(f"{args.action} not finished ({exc}): run it again",
                              file=sys.stderr)
                        return ExitCode.FAILURE
                _print(args, counts, f"{args.action}: " + ", ".join(
                    f"{count} {kind}" for kind, count in counts.items()))
            return ExitCode.OK
        finally:
            await store.close()

    return _run(act())


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="relayd", description=__doc__,
        epilog=f"`relayd COMMAND --help` shows a command's options. Commands read "
               f"{DEFAULT_CONFIG} unless given --config.")
    top.add_argument("--version", action="version", version=f"relayd {relayd.__version__}")
    # A parser added without help= is left out of the listing: `worker` (run starts it).
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(parent: Any, name: str, handler: Callable[..., int], help_text: str | None,
                json_output: bool = False) -> argparse.ArgumentParser:
        listed = {} if help_text is None else {"help": help_text, "description": help_text}
        sub: argparse.ArgumentParser = parent.add_parser(name, **listed)
        sub.add_argument("--config", default=DEFAULT_CONFIG,
                         help="the YAML config file (default: %(default)s)")
        if json_output:
            sub.add_argument("--json", action="store_true", help="machine-readable output")
        sub.set_defaults(handler=handler)
        return sub

    command(commands, "check-config", cmd_check_config, "validate the config and exit")
    run = command(commands, "run", cmd_run, "run the relay workers")
    run.add_argument("--role", choices=[*ROLES, "all"], default="all",
                     help="all: inbound, outbound, gdpr when gdpr.identity_user is set, "
                     "edge when workers.edge > 0, and retention when retention.enabled")
    one = command(commands, "worker", cmd_worker, None)
    one.description = "One worker process, started by `relayd run`: not for operators."
    one.add_argument("--role", choices=ROLES, required=True, help="what it works on")
    one.add_argument("--name", help="how its log lines name it, e.g. inbound-0")
    one.add_argument("--control-fd", type=int, help="socket to the supervisor (by `run`)")
    command(commands, "edge", cmd_edge, "serve device apps over WebSocket (edge.name needed)")
    keeper = command(commands, "vault", cmd_vault,
                     "serve the user keys of hosts with store.key_vault: amqp (in vault.file)")
    keeper.add_argument("--create", action="store_true",
                        help="make vault.file, for a new deployment only, and exit")
    command(commands, "status", cmd_status, "workers, queues, rates and keys of a relay",
            json_output=True)

    def kid(value: str) -> str:
        return _valid_id(keys.KID_PATTERN, value, "a kid")

    key_commands = commands.add_parser("keys", help="the relay's keys").add_subparsers(
        dest="action", required=True)
    generate = command(key_commands, "generate", cmd_keys_generate, "create missing keys")
    generate.add_argument("--kid", type=kid,
                          help="key id for a new HPKE key (default: rYYYY-MM-DD)")
    generate.add_argument("--kem", choices=[k.value for k in Kem], default=Kem.X25519.value,
                          help="key encapsulation of a new HPKE key (default: %(default)s)")
    command(key_commands, "show", cmd_keys_show, "print the current public keys as JSON")

    topo = commands.add_parser("topology", help="exchanges and queues").add_subparsers(
        dest="action", required=True)
    command(topo, "declare", cmd_topology_declare, "declare everything, idempotently",
            json_output=True)
    command(topo, "move-device-queues", cmd_topology_move,
            "upgrade: move device queues named by device id (relayd 0.1.0) to their keyed "
            "names", json_output=True)
    command(topo, "move-business-inboxes", cmd_topology_move,
            "upgrade, with relayd stopped: move business inboxes named by business id "
            "(relayd 0.2.0) to their keyed names", json_output=True)

    stores = commands.add_parser("store", help="the registry's database").add_subparsers(
        dest="action", required=True)
    command(stores, "migrate", cmd_store_migrate, "bring the schema to this version",
            json_output=True)
    command(stores, "move-keys", cmd_store_move_keys,
            "move the user keys the store holds into store.key_vault, and destroy them in"
            " the store", json_output=True)
    copy = command(stores, "copy", cmd_store_copy,
                   "copy a SQLite registry into the configured PostgreSQL store",
                   json_output=True)
    copy.add_argument("--from", dest="source", required=True, help="sqlite:///PATH")
    copy.add_argument("--force", action="store_true",
                      help="replace what the target holds (refused by default)")

    def business_id(value: str) -> str:
        return _valid_id(payload.BUSINESS_ID, value, "a business id")

    def device_id(value: str) -> str:
        return _valid_id(payload.DEVICE_ID, value, "a device id")

    def user_id(value: str) -> str:
        if not payload.is_user_id(value):
            raise argparse.ArgumentTypeError(
                f"a user id is 1 to {payload.MAX_USER_ID} characters of UTF-8 text, no NUL")
        return value

    biz = commands.add_parser("business", help="registered businesses").add_subparsers(
        dest="action", required=True)
    add = command(biz, "add", cmd_business, "register (and provision) a business",
                  json_output=True)
    add.add_argument("id", type=business_id, help="the business id, as in replies and events")
    add.add_argument("--amqp-user", required=True, help="the RabbitMQ user it connects as")
    add.add_argument("--first-party", action="store_true",
                     help="the operator's own desk: it also receives the user's account id")
    add.add_argument("--auth", choices=["password", "x509"],
                     help="password, or x509: certificate only, its CN = the user "
                          "(default: amqp.management.auth)")
    add.add_argument("--password-file", type=Path,
                     help="write a new password here (mode 0600) instead of printing it")
    command(biz, "list", cmd_business, "list businesses", json_output=True)
    remove = command(biz, "remove", cmd_business,
                     "revoke its user, close its connections, delete its inbox, unregister it",
                     json_output=True)
    remove.add_argument("id", type=business_id, help="the business id")
    rotate = command(biz, "rotate-credentials", cmd_business,
                     "issue a new password and close the open connections", json_output=True)
    rotate.add_argument("id", type=business_id, help="the business id")
    rotate.add_argument("--password-file", type=Path,
                        help="write the new password here (mode 0600) instead of printing it")

    dev = commands.add_parser("device", help="registered devices").add_subparsers(
        dest="action", required=True)
    add = command(dev, "add", cmd_device, "register a device", json_output=True)
    add.add_argument("--user", required=True, type=user_id,
                     help="the user's account id")
    add.add_argument("--device", required=True, type=device_id, help="the device id")
    # base64url may start with '-': pass keys as --enc-key=VALUE
    add.add_argument("--enc-key", required=True, help="HPKE public key, base64url (--enc-key=B64)")
    add.add_argument("--sign-key", required=True,
                     help="Ed25519 public key, base64url (--sign-key=B64)")
    add.add_argument("--kem", choices=[k.value for k in Kem], default=Kem.X25519.value,
                     help="the key encapsulation of --enc-key (default: %(default)s)")
    listing = command(dev, "list", cmd_device, "list devices", json_output=True)
    listing.add_argument("--user", type=user_id, help="only this user's devices")
    remove = command(dev, "remove", cmd_device, "unregister a device", json_output=True)
    remove.add_argument("device", type=device_id, help="the device id")

    rights = commands.add_parser("gdpr", help="data subjects' rights and retention").add_subparsers(
        dest="action", required=True)
    erase = command(rights, "erase", cmd_gdpr, "erase everything held about a user (Art. 17)",
                    json_output=True)
    erase.add_argument("--user", required=True, type=user_id,
                     help="the user's account id")
    export = command(rights, "export", cmd_gdpr,
                     "print everything held about a user as JSON (Art. 15)")
    export.add_argument("--user", required=True, type=user_id,
                     help="the user's account id")
    command(rights, "prune", cmd_gdpr, "run one retention pass now", json_output=True)
    command(rights, "audit", cmd_gdpr, "list the audit records", json_output=True)

    completion = commands.add_parser(
        "completion", help="print the bash completion script",
        description="Print the bash completion script: "
                    "relayd completion > /etc/bash_completion.d/relayd")
    completion.set_defaults(handler=cmd_completion)
    return top


def _error(*lines: str) -> None:
    """An error for the operator, on stderr; on the journal, filed at priority err."""
    prefix = "<3>" if log.to_journal(sys.stderr) else ""
    for line in lines:
        print(prefix + line, file=sys.stderr)


def _stdout_closed() -> bool:
    """Whether stdout is a pipe that nobody reads any more (`relayd ... | head -1`)."""
    poller = select.poll()
    poller.register(sys.stdout.fileno(), select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.handler is cmd_completion:  # needs no config
            code: int = cmd_completion(args)
        else:
            settings = config.load(Path(args.config))
            # The daemon logs to stdout, for the journal; a command keeps its stdout for
            # its output (--json), so its log lines go to stderr.
            daemon = args.handler in (cmd_run, cmd_worker, cmd_edge, cmd_vault)
            log.setup(settings.logging, sys.stdout if daemon else sys.stderr)
            code = args.handler(args, settings)
        sys.stdout.flush()  # here, where a closed pipe is still ours to report
    except ConfigError as exc:
        _error(f"config error in {args.config}:",
               *(f"  {key}: {why}" for key, why in exc.problems.items()))
        return ExitCode.CONFIG
    except StoreUnavailableError as exc:
        _error(f"cannot reach the store: {exc}")
        return ExitCode.UNAVAILABLE
    except BrokenPipeError as exc:  # a ConnectionError, but maybe not the broker's
        if not _stdout_closed():
            _error(f"cannot reach the broker: {exc}")
            return ExitCode.UNAVAILABLE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # drop the rest
        _error("relayd: output cut short: whatever read relayd's stdout exited first")
        return ExitCode.BROKEN_PIPE
    except (ConnectionError, aiormq.exceptions.AMQPConnectionError) as exc:
        _error(f"cannot reach the broker: {exc}")
        return ExitCode.UNAVAILABLE
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        _error("the broker refused a declaration (a queue or exchange of that name exists "
               f"with other arguments; see docs/operations.md, upgrading): {exc}")
        return ExitCode.FAILURE
    except OSError as exc:
        _error(f"relayd: {exc}")
        return ExitCode.FAILURE
    except KeyboardInterrupt:
        return ExitCode.FAILURE
    except Exception as exc:  # a bug, or a failure nothing above names
        if args.command in ("run", "worker", "edge", "vault"):  # a daemon: type and frames, no text
            log.get("relayd.cli").exception("crashed")
        else:  # an operator's command: the operator needs the message
            _error(f"relayd: {type(exc).__name__}: {exc}")
        return ExitCode.SOFTWARE
    return code
