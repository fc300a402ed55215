"""The command line: `idstitch ingest | serve | worker | parked | profile | explain | stats | keys |
migrate | copy | simulate | accuracy | report | bench`.

An edge: it parses arguments, calls the engine or reads the store, and prints. Exit codes:
0 success (also for an ingest that rejected some messages: they are listed on stderr and counted);
1 the profile asked for (or its space) is not in the store (or the parked request), or the store stayed
locked, unavailable (PostgreSQL gone past the 2 minutes) or unwritable (a full disk), or an ingest input
(a file of a directory included) could no longer be read, with what committed before kept; 2 a usage or
configuration error before anything is written (missing or unreadable file, a directory without a data
file or with an unreadable entry, unknown space or source, bad store URL, invalid config, a copy refused;
a copy that meets a stored message whose source is no longer configured keeps what it copied before);
130 / 143 an ingest or copy interrupted by Ctrl-C / SIGTERM (every batch committed before that is kept;
run the same command again to resume). `serve`
exits 0 after a graceful SIGTERM / Ctrl-C (every request accepted was committed and answered); so
does `worker` (the group it was resolving is committed and acknowledged first). A reader that goes
away (`| head`) changes neither what a command does nor its exit code.
"""

from __future__ import annotations

import errno
import gc
import gzip
import importlib
import json
import math
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any, Final, NoReturn

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text
from typer.core import TyperArgument, TyperCommand

from idstitch.config import DEFAULT_STORE_URL, Config, load_config
from idstitch.core.errors import ConfigError, IdstitchError
from idstitch.core.messages import format_timestamp
from idstitch.core.rules import IdentityRules
from idstitch.engine import OutcomeCounts
from idstitch.profiles import COLLECTIONS, InvalidProfileId, explain_document, find_root
from idstitch.storage.base import (
    EventQuery,
    IdentifierRecord,
    SpaceStats,
    Store,
    StoreConflict,
    StoreWriteFailed,
)
from idstitch.storage.urls import open_store

if TYPE_CHECKING:
    from idstitch.engine import Engine
    from idstitch.http.metrics import Metrics, QueueWorkerFigures
    from idstitch.ingest.stored import CopiedBefore
    from idstitch.queue.jetstream import QueueConfig
    from idstitch.queue.parked import ParkedRequest
    from idstitch.sim.accuracy import Accuracy
    from idstitch.sim.compare import Comparison

__all__ = ["OutputConsole", "app", "main"]

app = typer.Typer(
    name="idstitch",
    help="Realtime identity resolution for Segment-spec events: one persistent profile per person.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _print_version(asked: bool) -> None:
    """`--version`: idstitch's version and the store schema versions it reads and migrates to."""
    if not asked:
        return
    from importlib.metadata import version

    from idstitch.storage.migrations import read_migrations

    sqlite, postgres = read_migrations("sqlite")[-1][0], read_migrations("postgres")[-1][0]
    print(f"idstitch {version('idstitch')} (store schema: SQLite {sqlite}, PostgreSQL {postgres})")
    raise typer.Exit()


@app.callback()
def _options(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the version (and the store schema versions) and exit.",
        ),
    ] = False,
) -> None:
    """Options before the command."""


class OutputConsole(Console):
    """A rich console whose reader may go away (`| head`) without ending the command or changing its exit code."""

    def on_broken_pipe(self) -> None:
        """Write nothing more to the gone reader, and carry on.

        rich's own answer is exit 1, which here means "not found" (or "store busy"), and it would stop
        an ingest between two batches when only its stderr reader went away (`2>&1 | head`).
        """
        self.quiet = True
        # Python would otherwise flush what is still buffered at exit, fail again, and exit 120.
        with suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.file.fileno())


# Piped output is not cut to 80 columns: tables of ids and times need the room. A supervisor may start
# idstitch with stdout closed (`>&-`, sys.stdout None): rich then writes nowhere.
# No markup or emoji codes: what these print holds users' data, and "[test] Clicked" or "urn:smile:1"
# must show as sent (markup would eat the one and raise on "[/docs]", emoji would turn the other into 😄).
_PIPED = sys.stdout is None or not sys.stdout.isatty()
_WIDTH = 160 if _PIPED and "COLUMNS" not in os.environ else None
stdout = OutputConsole(highlight=False, markup=False, emoji=False, width=_WIDTH)
stderr = OutputConsole(stderr=True, highlight=False, markup=False, emoji=False)
# How long `ingest` waits for an unreachable PostgreSQL (a restart) before it stops, as for conflicts.
_OUTAGE_WAIT_SECONDS = 120.0


JsonPerSpaceOption = Annotated[
    bool, typer.Option("--json", help="JSON: one object with --space, else a list with one per space.")
]
StoreOption = Annotated[
    str,
    typer.Option(
        "--store",
        envvar="IDSTITCH_STORE",
        metavar="URL",
        help="Store URL: sqlite:///relative.db, sqlite:////absolute.db, "
        "postgresql://user:password@host:5432/db.",
        show_default=True,
    ),
]
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        envvar="IDSTITCH_CONFIG",
        metavar="FILE",
        help="TOML config file (default: ./idstitch.toml if present, else one space `default`).",
        dir_okay=False,
    ),
]
SpaceOption = Annotated[
    str | None,
    typer.Option(
        "--space",
        envvar="IDSTITCH_SPACE",
        metavar="NAME",
        help="Space to use (default: the only configured one, or `default`).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
JsonSummaryOption = Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
BatchSizeOption = Annotated[
    int,
    typer.Option(
        "--batch-size", min=1, max=100_000, metavar="N", help="Messages per transaction (group commit)."
    ),
]
_QUEUE_HELP = (
    "NATS JetStream URL: nats://host:port[,nats://other:port][?stream=NAME&subject=PREFIX&consumer=NAME"
    "&ack_wait=SECONDS] "
    "(defaults: stream IDSTITCH, subjects idstitch.ingest.<space>, consumer idstitch-workers, ack_wait 60)."
)
QueueOption = Annotated[
    str, typer.Option("--queue", envvar="IDSTITCH_QUEUE", metavar="URL", help=_QUEUE_HELP)
]
CollectionOption = Annotated[
    str | None,
    typer.Option(
        "--collection", metavar="users|accounts", help="users or accounts (default: inferred from ID)."
    ),
]


class UsageError(IdstitchError):
    """A command line that cannot be carried out as given (exit code 2)."""


class _PlainUsage(TyperCommand):
    """A command whose usage line shows its arguments as `FILE...` and `ID`.

    Typer writes a required argument as `{FILE...}...`, braces and a second ellipsis included, which
    reads like a choice; click's own convention is the bare metavar.
    """

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        """The usage line's words: [OPTIONS], then each argument by its plain name."""
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if not isinstance(param, TyperArgument):
                pieces.extend(param.get_usage_pieces(ctx))
                continue
            name = param.metavar or (param.name or "").upper()
            if param.nargs != 1 and not name.endswith("..."):
                name += "..."
            pieces.append(name if param.required else f"[{name}]")
        return pieces


def _plural(count: int, singular: str, plural: str | None = None) -> str:
    """`1 message`, `2 messages`, `1,000 people`: a count with its noun in the right number."""
    return f"{count:,} {singular if count == 1 else plural or singular + 's'}"


def _error(text: str, code: int = 2) -> NoReturn:
    """One line on stderr, then exit."""
    stderr.print(f"error: {text}", soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn errors a user can fix into one line on stderr and exit code 2, never a traceback."""
    try:
        yield
    except BrokenPipeError:
        # `idstitch profile … --json | head`: the reader has gone, which is not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None
    except IdstitchError as error:
        _error(str(error))
    except (StoreConflict, StoreWriteFailed) as error:
        # Another process kept the store busy past the engine's retries, or its disk is full; what
        # committed before stays.
        _error(f"{error}; what was committed before is kept: run the same command again to resume", 1)
    except sqlite3.DatabaseError as error:
        _error(f"store: {error}")
    except OSError as error:
        _error(f"{error.strerror or error}: {error.filename}" if error.filename else str(error))
    except Exception as error:
        # psycopg's errors (a role without rights, say), without importing psycopg for SQLite users.
        if not type(error).__module__.startswith("psycopg"):
            raise
        _error(f"store: {type(error).__name__}: {' '.join(str(error).split())}")


@contextmanager
def _store(url: str, *, read_only: bool = False) -> Iterator[Store]:
    """The store, opened for a command; a reading command's must exist, and it never migrates a schema
    or needs write rights."""
    if read_only and url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if path not in ("", ":memory:") and not Path(path).exists():
            raise UsageError(f"store {url} does not exist yet (run `idstitch ingest FILE` first)")
    store = open_store(url, read_only=read_only)
    try:
        yield store
    finally:
        store.close()


def _space_named(config: Config, space: str | None) -> str:
    """The space asked for, else the default one; with several configured and none a default, a usage error."""
    if space is None and len(config.spaces) > 1 and config.default_space not in config.spaces:
        names = ", ".join(sorted(config.spaces))
        raise UsageError(f"{len(config.spaces)} spaces are configured ({names}): name one with --space")
    return space or config.default_space


def _space_for_reading(config: Config, store: Store, space: str | None, *, absent_code: int = 2) -> str:
    """The space a read-only command looks at; it must be in the store (reading creates nothing)."""
    name = _space_named(config, space)
    held = store.spaces()
    if name in held:
        return name
    if name not in config.spaces:
        known = ", ".join(sorted(set(config.spaces) | set(held))) or "none"
        raise UsageError(f"unknown space {name!r} (known: {known})")
    # Configured but never written to: reading it would answer "no profile" or zeros, as if it were
    # an empty space, when the likelier story is a wrong --store or --config.
    _error(f"space {name} is not in the store (it holds: {', '.join(held) or 'no space yet'})", absent_code)


def _ingest_target(config: Config, space: str | None, source: str | None) -> tuple[str, str | None]:
    """The space and source an ingest writes to, checked against the config before the store is opened."""
    name = _space_named(config, space)
    sources = config.space(name).sources  # unknown space: a ConfigError naming the configured ones
    if source is not None:
        if source not in sources:
            known = ", ".join(sorted(sources)) or "none"
            raise UsageError(f"unknown source {source!r} in space {name} (configured: {known})")
        return name, source
    if len(sources) > 1:
        # Guessing would store the events with no source and bypass that source's policy (merge = false).
        raise UsageError(
            f"space {name} has several sources ({', '.join(sorted(sources))}): name one with --source"
        )
    return name, next(iter(sources), None)


def _rules(config: Config, store: Store, space: str) -> IdentityRules:
    base = config.spaces[space].rules if space in config.spaces else IdentityRules.default()
    return base.with_learned(store.learned_types(space))


def _time(value: datetime) -> str:
    return format_timestamp(value)


def _short_time(value: datetime | str) -> str:
    """A time for tables: `2026-03-02 10:05:00` (UTC)."""
    text = value if isinstance(value, str) else format_timestamp(value)
    return text[:19].replace("T", " ")


# -- ingest ----------------------------------------------------------------------------------------


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the open batch rolls back cleanly."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


@dataclass
class _Tally(OutcomeCounts):
    batches: int = 0
    seconds: float = 0.0  # a copy's time on this space
    moved: int = 0  # messages a copy resolved to another profile or account than the source had
    drops_differ: int = 0  # messages a copy dropped other identifiers from than the source, or by other rules

    def summary(self, seconds: float) -> dict[str, Any]:
        return {
            **self.counts(),
            "batches": self.batches,
            "seconds": round(seconds, 3),
            "messages_per_second": round(self.messages / seconds) if seconds > 0 else 0,
        }


@app.command(cls=_PlainUsage)
def ingest(
    files: Annotated[
        list[str],
        typer.Argument(
            metavar="FILE|DIR...",
            help="NDJSON / JSON / batch-envelope files, .gz or not; - is stdin; a directory is read whole "
            "(an archive tree of Segment's or RudderStack's storage destination, in received order).",
        ),
    ],
    space: SpaceOption = None,
    source: Annotated[
        str | None,
        typer.Option(
            "--source",
            metavar="NAME",
            help="Source the messages came from; required when the space has several "
            "(default: the space's only source).",
        ),
    ] = None,
    batch_size: BatchSizeOption = 1000,
    quiet: QuietOption = False,
    as_json: JsonSummaryOption = False,
    store: StoreOption = DEFAULT_STORE_URL,
    config: ConfigOption = None,
) -> None:
    """Ingest files of Segment messages; each batch commits as one transaction, re-runs skip stored ones."""
    from idstitch.engine import Engine
    from idstitch.ingest.archive import plan_inputs
    from idstitch.ingest.files import printable_path, read_groups

    with _user_errors():
        for name in files:
            _check_input_file(name)
        plan = plan_inputs(files)
        for directory in plan.directories:
            for group in directory.groups:
                for path, _ in group:
                    _check_input_file(path)
        max_open = _allow_open_files(max(len(group) for group in plan.groups))
        settings = load_config(config)
        # Before the store is opened: opening creates the file and the engine bootstraps the spaces,
        # and a usage error must leave nothing behind.
        space_name, source = _ingest_target(settings, space, source)
        for directory in plan.directories:
            if directory.skipped:
                stderr.print(
                    f"{printable_path(directory.path)}: {_plural(directory.files, 'file')} to read; "
                    f"{directory.skipped_text()}",
                    soft_wrap=True,
                )
        with _store(store) as opened:
            engine = Engine(opened, settings, outage_wait=_OUTAGE_WAIT_SECONDS)
            _print_created_write_keys(engine)
            _warn_of_unconfigured_spaces(engine)
            _freeze_startup_objects()
            tally = _Tally()
            started = time.monotonic()
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
            progress = Progress(
                TextColumn("{task.description}", style="progress.description", markup=False),  # a file name
                BarColumn(),
                TaskProgressColumn(),
                DownloadColumn(),
                TextColumn("{task.fields[messages]:,} messages"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=stderr,
                disable=quiet or not _stderr_is_a_terminal(),
            )
            try:
                with progress:
                    task = progress.add_task("ingest", total=None, messages=0)
                    batches = read_groups(
                        plan.groups, batch_size=batch_size, received_at=datetime.now(UTC), max_open=max_open
                    )
                    for batch in batches:
                        result = engine.ingest(
                            [item for _, item in batch.items], space=space_name, source=source
                        )
                        tally.batches += 1
                        for outcome in result.outcomes:
                            tally.count(outcome)
                            if outcome.status == "rejected":
                                where = batch.items[outcome.index][0]
                                stderr.print(f"{where}: {outcome.error}", soft_wrap=True)
                        progress.update(
                            task, completed=batch.bytes_read, total=batch.bytes_total, messages=tally.messages
                        )
            except (KeyboardInterrupt, _Terminated) as stop:
                stderr.print(
                    f"interrupted: {_plural(tally.batches, 'batch', 'batches')} "
                    f"({_plural(tally.messages, 'message')}) committed and kept; "
                    "run the same command again to resume (stored messages are skipped)",
                    soft_wrap=True,
                )
                raise typer.Exit(143 if isinstance(stop, _Terminated) else 130) from None
            except (StoreWriteFailed, sqlite3.OperationalError) as failure:
                # The store could not be written (a full disk, an I/O error): no usage error (exit 2
                # says nothing was written), and the batches before this one are kept.
                where = "" if isinstance(failure, StoreWriteFailed) else f"store {store}: "
                _error(
                    f"{where}{failure}; {_plural(tally.batches, 'batch', 'batches')} "
                    f"({_plural(tally.messages, 'message')}) committed and kept: free space (or mend the "
                    "disk) and run the same command again to resume (stored messages are skipped)",
                    1,
                )
            except BrokenPipeError:
                raise  # stderr's reader has gone (`2>&1 | head`): not the input's fault, see _user_errors
            except OSError as failure:
                # An input that could be read when the run started cannot now (deleted by a sync running
                # beside it, a disk error): not a usage error (exit 2 says nothing was written), and the
                # batches before it are kept.
                where = f"{printable_path(failure.filename)}: cannot be read" if failure.filename else "input"
                _error(
                    f"{where} ({failure.strerror or failure}); {_plural(tally.batches, 'batch', 'batches')} "
                    f"({_plural(tally.messages, 'message')}) committed and kept: run the same command again "
                    "to resume (stored messages are skipped)",
                    1,
                )
            finally:
                signal.signal(signal.SIGTERM, previous)
            seconds = time.monotonic() - started
            summary = {**tally.summary(seconds), "files": plan.files, "skipped_files": plan.skipped}
            _print_summary(summary, plan.files, as_json)


def _allow_open_files(needed: int) -> int | None:
    """Raise this process's limit of open files to what reading `needed` files side by side takes.

    The files of one received-day of an archive are read together (merged in received order); a big
    archive has hundreds a day. Past the hard limit (which only root may raise), the files of such a day
    take turns at the descriptors there are: returned is how many may be open at once, None for all.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = needed + _RESERVED_FILES
    if wanted <= soft:
        return None
    # macOS says its hard limit is unlimited but refuses a soft one past kern.maxfilesperproc (a ValueError).
    with suppress(ValueError, OSError):
        if hard == resource.RLIM_INFINITY or wanted <= hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            return None
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    try:
        open_now = len(os.listdir("/dev/fd"))
    except OSError:
        open_now = 16
    return max(1, soft - open_now - _RESERVED_FILES)


# Descriptors kept free of input files: the store (SQLite's database, journal and WAL index, or
# PostgreSQL's socket), the terminal, the interpreter's own.
_RESERVED_FILES: Final = 32


def _check_input_file(name: str) -> None:
    """Refuse an input that cannot be read before anything is written (exit 2), not halfway through.

    A regular file is opened (and closed) to prove it; a pipe (`<(…)`, a FIFO) is not, as opening
    and closing it would let its writer go on without a reader and die of SIGPIPE. `-` needs a stdin.
    """
    if name == "-":
        if sys.stdin is None:  # started with stdin closed (`<&-`), as a supervisor may
            raise UsageError("-: standard input is closed")
        return
    path = Path(name)
    if path.is_dir():
        return  # walked by plan_inputs, which checks what it finds
    if not path.exists():
        raise UsageError(f"{name}: no such file")
    try:
        if path.is_file():
            os.close(os.open(name, os.O_RDONLY))
        elif path.is_socket():
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
        elif not os.access(name, os.R_OK):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as error:
        raise UsageError(f"{name}: cannot be read ({error.strerror or error})") from None


def _stderr_is_a_terminal() -> bool:
    """Whether a person may be watching stderr: the progress bar is for them, never for a log file.

    rich's own test also says yes for a file when FORCE_COLOR or TTY_COMPATIBLE is set (CI often sets
    the first), and its bar, redrawn ten times a second, then filled the log.
    """
    return stderr.is_terminal and sys.stderr is not None and sys.stderr.isatty()


def _freeze_startup_objects() -> None:
    """Leave what a long-running command built before its work (modules, config, engine) out of later scans.

    Python's full collections stop every thread, the writer and the event loop included; with the
    startup objects frozen one took 0.5 ms instead of 10 ms, and the longest in an ingest of 60,000
    messages 14 ms instead of 32 ms.
    """
    gc.collect()  # what is garbage now is freed, not kept for good
    gc.freeze()


def _print_created_write_keys(engine: Engine) -> None:
    """On a first run without a config, the write key and tokens just made are shown once: the user needs them."""
    for record in engine.created_write_keys:
        stderr.print(
            f"created space {record.space} with source {record.name}, write key {record.write_key}",
            soft_wrap=True,
        )
    for token in engine.created_tokens:
        kind = "Profile API read token" if token.kind == "read" else "Profile API admin token"
        stderr.print(f"created {kind} {token.token} for space {token.space}", soft_wrap=True)


def _warn_of_unconfigured_spaces(engine: Engine) -> None:
    """A space the store holds but the config no longer names (renamed or removed) is said once, as its
    profiles would otherwise vanish from the Profile API without a word."""
    for name in engine.store.spaces():
        if name not in engine.config.spaces:
            stderr.print(
                f"warning: the store holds space {name}, which the config does not name: its profiles are "
                f"neither served nor added to (a renamed space starts empty; read it with --space {name})",
                soft_wrap=True,
            )


def _print_summary(summary: dict[str, Any], files: int, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary))
        return
    lines = [
        f"ingested {_plural(summary['messages'], 'message')} from {_plural(files, 'file')} "
        f"in {summary['seconds']:.2f} s ({summary['messages_per_second']:,} messages/s)",
        f"  accepted          {summary['accepted']:>10,}",
        f"  duplicates        {summary['duplicates']:>10,}",
        f"  unresolved        {summary['unresolved']:>10,}",
        f"  rejected          {summary['rejected']:>10,}",
        f"  profiles created  {summary['profiles_created']:>10,}",
        f"  accounts created  {summary['accounts_created']:>10,}",
        f"  merges            {summary['merges']:>10,}",
    ]
    print("\n".join(lines))


# -- serve -----------------------------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[
        str, typer.Option("--host", envvar="IDSTITCH_HOST", metavar="HOST", help="Address to listen on.")
    ] = "127.0.0.1",
    port: Annotated[
        int,
        typer.Option(
            "--port", envvar="IDSTITCH_PORT", min=0, max=65535, metavar="PORT", help="Port (0: any free one)."
        ),
    ] = 8000,
    profile_port: Annotated[
        int | None,
        typer.Option(
            "--profile-port",
            envvar="IDSTITCH_PROFILE_PORT",
            min=0,
            max=65535,
            metavar="PORT",
            help="Serve the Profile API on its own port (default: on --port, beside the Tracking API).",
        ),
    ] = None,
    profile_workers: Annotated[
        int,
        typer.Option(
            "--profile-workers",
            envvar="IDSTITCH_PROFILE_WORKERS",
            min=0,
            max=64,
            metavar="N",
            help="Serve --profile-port from N read-only processes of their own (0: in this process).",
        ),
    ] = 0,
    queue: Annotated[
        str | None,
        typer.Option(
            "--queue",
            envvar="IDSTITCH_QUEUE",
            metavar="URL",
            help="Queue mode: answer requests once persisted in this NATS JetStream stream, for "
            "`idstitch worker`s to resolve, instead of writing them to the store here. " + _QUEUE_HELP,
        ),
    ] = None,
    max_pending: Annotated[
        int,
        typer.Option(
            "--max-pending",
            envvar="IDSTITCH_MAX_PENDING",
            min=1,
            metavar="N",
            help="Messages accepted but not yet durable past which requests are answered 429.",
        ),
    ] = 50_000,
    retry_after: Annotated[
        int,
        typer.Option(
            "--retry-after",
            envvar="IDSTITCH_RETRY_AFTER",
            min=1,
            metavar="SECONDS",
            help="The Retry-After (and X-RateLimit-Reset) of a 429 or a 503 while shutting down.",
        ),
    ] = 1,
    public_url: Annotated[
        str | None,
        typer.Option(
            "--public-url",
            envvar="IDSTITCH_PUBLIC_URL",
            metavar="URL",
            help="The URL clients reach this server by, behind a reverse proxy (https://events.example.com): "
            "the settings document sends analytics.js there. Default: each request's Host and scheme.",
        ),
    ] = None,
    store: StoreOption = DEFAULT_STORE_URL,
    config: ConfigOption = None,
) -> None:
    """Serve the Tracking API (POST /v1/batch, ...) and the Profile API (GET /v1/spaces/...) until SIGTERM."""
    from idstitch.engine import Engine
    from idstitch.http.server import run_server  # uvicorn loads only for this command
    from idstitch.http.source_settings import parse_public_url

    with _user_errors():
        settings = load_config(config)
        public_address = None if public_url is None else parse_public_url(public_url)
        mode = ""
        if queue is not None:
            from idstitch.queue.jetstream import parse_queue_url

            parsed = parse_queue_url(queue)  # a bad URL fails before the store is touched
            mode = f" (queue mode: JetStream {parsed.shown_servers} stream {parsed.stream})"
        with _store(store) as opened:
            engine = Engine(opened, settings)
            _print_created_write_keys(engine)
            _warn_of_unconfigured_spaces(engine)
            _freeze_startup_objects()
            run_server(
                engine,
                host=host,
                port=port,
                announce=lambda url: print(f"idstitch serving on {url}{mode}", file=sys.stderr, flush=True),
                max_pending_messages=max_pending,
                retry_after=retry_after,
                profile_port=profile_port,
                profile_workers=profile_workers,
                queue=queue,
                public_address=public_address,
            )


# -- worker ----------------------------------------------------------------------------------------


@app.command()
def worker(
    queue: QueueOption,
    batch: Annotated[
        int,
        typer.Option(
            "--batch",
            min=1,
            max=1000,
            metavar="N",
            help="Queue messages (each one request of the Tracking API) fetched and committed together.",
        ),
    ] = 20,
    drain: Annotated[
        bool, typer.Option("--drain", help="Exit once the queue is empty instead of waiting for more.")
    ] = False,
    as_json: JsonSummaryOption = False,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            envvar="IDSTITCH_WORKER_METRICS_PORT",
            min=0,
            max=65535,
            metavar="PORT",
            help="Serve Prometheus metrics (outcomes, merges, drops, commit latency, queue backlog) on "
            "http://HOST:PORT/metrics (0: any free port, printed at start). Off by default.",
        ),
    ] = None,
    metrics_host: Annotated[
        str,
        typer.Option(
            "--metrics-host",
            envvar="IDSTITCH_WORKER_METRICS_HOST",
            metavar="HOST",
            help="Address of --metrics-port.",
        ),
    ] = "127.0.0.1",
    store: StoreOption = DEFAULT_STORE_URL,
    config: ConfigOption = None,
) -> None:
    """Resolve what `serve --queue` put on NATS JetStream: fetch, commit, then acknowledge; run N of them."""
    from idstitch.engine import Engine
    from idstitch.http.logs import configure_logging
    from idstitch.queue.jetstream import parse_queue_url
    from idstitch.queue.worker import WorkerSummary, run_worker

    with _user_errors():
        settings = load_config(config)
        parsed = parse_queue_url(queue)
        with _store(store) as opened, ExitStack() as cleanup:
            engine = Engine(opened, settings)
            _print_created_write_keys(engine)
            _warn_of_unconfigured_spaces(engine)
            configure_logging()  # JSON lines on stderr, as serve writes them
            running = WorkerSummary()
            on_commit = None
            metrics_line = ""
            if metrics_port is not None:
                metrics, metrics_url = _serve_worker_metrics(running, metrics_host, metrics_port, cleanup)
                on_commit = metrics.count_commit
                metrics_line = f"; metrics on {metrics_url}"
            _freeze_startup_objects()
            summary = run_worker(
                engine,
                parsed,
                batch=batch,
                drain=drain,
                handle_signals=True,
                on_start=lambda line: print(line + metrics_line, file=sys.stderr, flush=True),
                summary=running,
                on_commit=on_commit,
            )
        _print_worker_summary(summary.as_dict(), as_json)


def _serve_worker_metrics(
    summary: QueueWorkerFigures, host: str, port: int, cleanup: ExitStack
) -> tuple[Metrics, str]:
    """A worker's Prometheus endpoint on a thread of its own (stopped by `cleanup`); its URL."""
    from prometheus_client import start_http_server

    from idstitch.http.metrics import Metrics

    metrics = Metrics(worker=summary)
    try:
        server, _ = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as error:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {error.strerror or error}") from None
    cleanup.callback(server.server_close)
    cleanup.callback(server.shutdown)
    shown = f"[{host}]" if ":" in host else host
    return metrics, f"http://{shown}:{server.server_port}/metrics"


def _print_worker_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary), flush=True)
        return
    labels = [
        ("accepted", "accepted"),
        ("duplicates", "duplicates"),
        ("unresolved", "unresolved"),
        ("rejected", "rejected"),
        ("profiles created", "profiles_created"),
        ("accounts created", "accounts_created"),
        ("merges", "merges"),
        ("commits", "commits"),
        ("retried", "retried"),
        ("parked", "parked"),
    ]
    queued = _plural(summary["queue_messages"], "queue message")
    lines = [
        f"worker stopped after {summary['seconds']:.2f} s: {queued}, "
        f"{_plural(summary['messages'], 'message')} ({summary['messages_per_second']:,} messages/s)",
        *(f"  {label:<18}{summary[key]:>10,}" for label, key in labels),
    ]
    print("\n".join(lines), flush=True)


# -- parked ----------------------------------------------------------------------------------------

parked_app = typer.Typer(
    help="The requests workers parked in the dead-letter stream (`<stream>_DEAD`): list, show, replay, delete.",
    no_args_is_help=True,
)
app.add_typer(parked_app, name="parked")
SequencesArgument = Annotated[
    list[int] | None,
    typer.Argument(metavar="SEQUENCE...", min=1, help="Sequences in the dead-letter stream (see `list`)."),
]


@parked_app.command("list")
def parked_list(
    queue: QueueOption,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, metavar="N", help="At most N, oldest first.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object.")] = False,
) -> None:
    """Parked requests, oldest first: sequence, when, space, messages, deliveries and why it was parked."""
    from idstitch.queue.jetstream import parse_queue_url
    from idstitch.queue.parked import parked_requests

    with _user_errors():
        parsed = parse_queue_url(queue)
        items = [_parked_json(parsed.subject, parked) for parked in parked_requests(parsed, limit=limit)]
        if as_json:
            print(json.dumps({"dead_stream": parsed.dead_stream, "parked": items}, indent=2))
            return
        where = f"{parsed.dead_stream} on {parsed.shown_servers}"
        if not items:
            print(f"no parked requests in {where}")
            return
        print(f"{_plural(len(items), 'parked request')} in {where}:")
        header = ("sequence", "parked at", "space", "messages", "deliveries", "reason")
        rows = [
            (
                str(item["sequence"]),
                "-" if item["parked_at"] is None else _short_time(item["parked_at"]),
                _shown(item["space"]),
                "-" if item["messages"] is None else f"{item['messages']:,}",
                "-" if item["deliveries"] is None else str(item["deliveries"]),
                _shown(item["reason"]),
            )
            for item in items
        ]
        widths = [max(len(row[column]) for row in (header, *rows)) for column in range(5)]
        for row in (header, *rows):
            cells = [row[0].rjust(widths[0]), row[1].ljust(widths[1]), row[2].ljust(widths[2])]
            cells += [row[3].rjust(widths[3]), row[4].rjust(widths[4]), row[5]]
            print("  ".join(cells).rstrip())


def _parked_json(prefix: str, parked: ParkedRequest) -> dict[str, Any]:
    """One parked request as listed; its space, source and message count read from the request itself."""
    from idstitch.queue.envelope import decode

    space = parked.subject.removeprefix(f"{prefix}.")  # the subject's token, for one that cannot be read
    source = messages = None
    try:
        batch = decode(parked.data)
    except IdstitchError:
        pass  # not a request this version reads: the reason says why, `show` gives its bytes
    else:
        space, source, messages = batch.space, batch.source, len(batch.items)
    return {
        "sequence": parked.sequence,
        "parked_at": None if parked.parked_at is None else parked.parked_at.isoformat(),
        "space": space,
        "source": source,
        "messages": messages,
        "bytes": len(parked.data),
        "deliveries": parked.deliveries,
        "subject": parked.subject,
        "original_sequence": parked.original_sequence,
        "reason": parked.reason,
    }


@parked_app.command("show", cls=_PlainUsage)
def parked_show(
    sequence: Annotated[int, typer.Argument(metavar="SEQUENCE", help="Its sequence (see `list`).")],
    queue: QueueOption,
) -> None:
    """Print one parked request's bytes as they were queued (JSON), to read or to fix."""
    from idstitch.queue.jetstream import parse_queue_url
    from idstitch.queue.parked import parked_request

    with _user_errors():
        parsed = parse_queue_url(queue)
        parked = parked_request(parsed, sequence)
        if parked is None:
            _error(f"no parked request {sequence} in {parsed.dead_stream}", 1)
        sys.stdout.buffer.write(parked.data)
        if sys.stdout.isatty():
            sys.stdout.buffer.write(b"\n")
        sys.stdout.flush()


@parked_app.command("replay", cls=_PlainUsage)
def parked_replay(
    queue: QueueOption,
    sequences: SequencesArgument = None,
    replay_all: Annotated[bool, typer.Option("--all", help="Every parked request.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object.")] = False,
) -> None:
    """Publish parked requests again to the subjects they came from (once the cause is fixed), then delete them."""
    from idstitch.queue.jetstream import parse_queue_url
    from idstitch.queue.parked import replay_parked

    with _user_errors():
        parsed = parse_queue_url(queue)
        if replay_all and sequences:
            raise UsageError("name sequences to replay or give --all, not both")
        wanted = None if replay_all else _parked_sequences(parsed, sequences, "replay (or --all)")
        replayed = replay_parked(parsed, wanted)
        if as_json:
            print(json.dumps({"replayed": replayed}))
            return
        listed = f": {', '.join(map(str, replayed))}" if replayed else ""
        print(f"replayed {_plural(len(replayed), 'parked request')} to {parsed.stream}{listed}")


@parked_app.command("delete", cls=_PlainUsage)
def parked_delete(
    queue: QueueOption,
    sequences: SequencesArgument = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object.")] = False,
) -> None:
    """Delete parked requests for good: those that can never succeed (their messages are not stored)."""
    from idstitch.queue.jetstream import parse_queue_url
    from idstitch.queue.parked import delete_parked

    with _user_errors():
        parsed = parse_queue_url(queue)
        deleted = delete_parked(parsed, _parked_sequences(parsed, sequences, "delete"))
        if as_json:
            print(json.dumps({"deleted": deleted}))
            return
        listed = f": {', '.join(map(str, deleted))}" if deleted else ""
        print(f"deleted {_plural(len(deleted), 'parked request')} from {parsed.dead_stream}{listed}")


def _parked_sequences(queue: QueueConfig, sequences: list[int] | None, what: str) -> list[int]:
    """The sequences named, each of them parked; otherwise nothing is done (exit 1)."""
    from idstitch.queue.parked import parked_request

    if not sequences:
        raise UsageError(f"name the sequences to {what}; `idstitch parked list` shows them")
    wanted = list(dict.fromkeys(sequences))
    missing = [sequence for sequence in wanted if parked_request(queue, sequence) is None]
    if missing:
        names = ", ".join(map(str, missing))
        _error(f"no parked request {names} in {queue.dead_stream}: nothing was done", 1)
    return wanted


# -- profile / explain -----------------------------------------------------------------------------


def _shown(text: str) -> str:
    """`text` for a terminal: every character that is not printable (controls, invisible format
    characters, separators other than the space) becomes its escape, as `\\x1b` or `\\u200b`."""
    # Identifiers, trait keys and event names come from whoever sends events: raw, an ESC would drive the
    # operator's terminal, a newline would fake a table row, and a zero-width or bidi character would
    # make two different values look the same. --json keeps the exact values.
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def _check_collection(collection: str | None) -> None:
    if collection is not None and collection not in COLLECTIONS:
        raise UsageError(f"--collection must be users or accounts, got {collection!r}")


def _identifier_json(record: IdentifierRecord) -> dict[str, str | bool]:
    return {
        "type": record.type,
        "value": record.value,
        "first_seen": _time(record.first_seen),
        "last_seen": _time(record.last_seen),
        # The flags the text output shows: --json carries the same facts.
        "suspect": record.suspect,
        "retired": record.retired,
    }


def _profile_document(
    store: Store, space: str, root: str, *, most_links: int | None = None
) -> dict[str, Any]:
    """`profile --json`'s document; `most_links` keeps only the first links (the text view's)."""
    record = store.profile(space, root)
    if record is None:
        raise UsageError(f"profile {root} vanished while reading it")
    links = []
    for linked in store.links(space, root)[:most_links]:
        other = store.profile(space, linked)
        links.append(
            {
                "collection": other.collection
                if other is not None
                else ("users" if record.collection == "accounts" else "accounts"),
                "segment_id": linked,
                "identifiers": [_identifier_json(item) for item in store.identifiers(space, linked)],
            }
        )
    return {
        "segment_id": record.segment_id,
        "collection": record.collection,
        "identifiers": [_identifier_json(item) for item in store.identifiers(space, root)],
        "traits": store.traits(space, root),
        "event_count": store.event_count(space, root),
        "merged_segment_ids": list(record.merged_segment_ids),
        "links": links,
    }


@contextmanager
def _found_profile(
    id: str, space: str | None, collection: str | None, store_url: str, config: Path | None
) -> Iterator[tuple[Store, str, str]]:
    """The open store, the space and the root profile an ID names; exit 1 with a message when unknown."""
    _check_collection(collection)
    settings = load_config(config)
    # One moment of the graph for everything shown: `ingest` or `serve` may merge this profile meanwhile.
    with _store(store_url, read_only=True) as opened, opened.snapshot():
        space_name = _space_for_reading(settings, opened, space, absent_code=1)
        try:
            root = find_root(opened, _rules(settings, opened, space_name), space_name, id, collection)
        except InvalidProfileId as error:
            raise UsageError(str(error)) from None
        if root is None:
            _not_found(id, space_name, collection)
        yield opened, space_name, root


def _not_found(text: str, space: str, collection: str | None) -> NoReturn:
    """Exit 1: nothing by that id; a forced collection is named, as the id may be in the other one."""
    what = f"{collection} profile" if collection else "profile"
    _error(f"no {what} {text} in space {space}", code=1)


@app.command(cls=_PlainUsage)
def profile(
    id: Annotated[
        str, typer.Argument(metavar="ID", help="type:value (e.g. email:jane@example.com) or a segment id.")
    ],
    space: SpaceOption = None,
    collection: CollectionOption = None,
    as_json: JsonOption = False,
    store: StoreOption = DEFAULT_STORE_URL,
    config: ConfigOption = None,
) -> None:
    """Show one profile: identifiers, traits, recent events, links."""
    with _user_errors(), _found_profile(id, space, collection, store, config) as (opened, space_name, root):
        if as_json:
            document = _profile_document(opened, space_name, root)
            print(json.dumps(document, indent=2, ensure_ascii=False))
            return
        # An account may have a hundred thousand users: a terminal gets the first ones and their count,
        # as it gets the ten most recent events; --json keeps them all.
        document = _profile_document(opened, space_name, root, most_links=_LINKS_SHOWN)
        _render_profile(opened, space_name, document, len(opened.links(space_name, root)))


_LINKS_SHOWN = 20


def _render_profile(store: Store, space: str, document: dict[str, Any], link_count: int) -> None:
    root = document["segment_id"]
    stdout.print(Text.assemble((root, "bold"), f" ({document['collection']}, space {space})"))
    if document["merged_segment_ids"]:
        stdout.print("merged profiles: " + ", ".join(document["merged_segment_ids"]))
    table = Table(title="identifiers", title_justify="left")
    for column in ("type", "value", "first seen (UTC)", "last seen (UTC)", "flags"):
        table.add_column(column, overflow="fold")
    for item in document["identifiers"]:
        notes = [flag for flag in ("suspect", "retired") if item[flag]]
        table.add_row(
            _shown(item["type"]),
            _shown(item["value"]),
            _short_time(item["first_seen"]),
            _short_time(item["last_seen"]),
            ", ".join(notes),
        )
    stdout.print(table)
    if document["traits"]:
        traits = Table(title="traits", title_justify="left")
        traits.add_column("key", overflow="fold")
        traits.add_column("value", overflow="fold")
        for key, value in document["traits"].items():
            traits.add_row(_shown(key), _shown(json.dumps(value, ensure_ascii=False)))
        stdout.print(traits)
    # The most recent by timestamp, as the Profile API's `events` lists them: a late-arriving old event
    # must not push the newest ones out of the ten.
    events = store.event_page(space, root, EventQuery(limit=10, descending=True))
    shown = f"{len(events)} most recent" if len(events) < document["event_count"] else "all"
    table = Table(title=f"events: {document['event_count']:,} ({shown})", title_justify="left")
    for column in ("timestamp (UTC)", "type", "name", "message id"):
        table.add_column(column, overflow="fold")
    for event in events:
        table.add_row(
            _short_time(event.timestamp), event.type, _shown(event.name or ""), _shown(event.message_id)
        )
    stdout.print(table)
    if document["links"]:
        shown = (
            f"first {len(document['links'])}; --json lists them all" if link_count > _LINKS_SHOWN else "all"
        )
        links = Table(title=f"links: {link_count:,} ({shown})", title_justify="left")
        for column in ("collection", "segment id", "identifiers"):
            links.add_column(column, overflow="fold")
        for link in document["links"]:
            names = ", ".join(f"{item['type']}:{item['value']}" for item in link["identifiers"])
            links.add_row(link["collection"], link["segment_id"], _shown(names))
        stdout.print(links)


@app.command(cls=_PlainUsage)
def explain(
    id: Annotated[str, typer.Argument(metavar="ID", help="type:value or a segment id.")],
    space: SpaceOption = None,
    collection: CollectionOption = None,
    as_json: JsonOption = False,
    store: StoreOption = DEFAULT_STORE_URL,
    config: ConfigOption = None,
) -> None:
    """Why a profile looks the way it does: its merges, the identifiers dropped and why, its suspects."""
    with _user_errors(), _found_profile(id, space, collection, store, config) as (opened, space_name, root):
        document = explain_document(opened, space_name, root)
        if document is None:
            raise UsageError(f"profile {root} vanished while reading it")
        if as_json:
            print(json.dumps(document, indent=2, ensure_ascii=False))
            return
        _render_explain(document)


def _render_explain(document: dict[str, Any]) -> None:
    lines = [f"profile {document['segment_id']} ({document['collection']})"]
    merges = document["merges"]
    lines.append(f"merges: {len(merges)}" + (" (oldest first)" if merges else ""))
    for item in merges:
        lines.append(
            f"  {item['at']}  {item['child']} merged into {item['parent']} via {item['via']} "
            f"(message {item['message_id']})"
        )
    dropped = document["dropped"]
    lines.append(f"dropped identifiers: {len(dropped)}")
    # One line per identifier and rule: a logged-in page of a source that may not send user_id drops it
    # from every call, and thousands of identical lines would bury the drops that differ.
    repeated: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for item in dropped:
        repeated.setdefault((item["identifier"], item["rule"]), []).append(item)
    for (identifier, rule), items in repeated.items():
        first, last = items[0], items[-1]
        where = (
            f"message {first['message_id']}"
            if len(items) == 1
            else f"{len(items):,} messages, the last ingested {last['message_id']} at {last['at']}"
        )
        lines.append(f"  {first['at']}  {identifier}  rule: {rule}  ({where})")
    retired = document["retired"]
    lines.append(
        f"retired identifiers: {len(retired)}"
        + (" (by an alias: still resolve here, count toward no limit)" if retired else "")
    )
    for item in retired:
        lines.append(
            f"  {item['identifier']}  first seen {item['first_seen']}, last seen {item['last_seen']}"
        )
    suspects = document["suspects"]
    lines.append(f"suspect identifiers: {len(suspects)}")
    for item in suspects:
        where = "on this profile" if item["on_profile"] else "dropped from this profile's messages"
        if item["evidence_type"] == "declared":
            # Pre-declared non-unique by the space's rules (SPEC §5): no values were seen with it.
            evidence = "declared non-unique by the space's rules"
        else:
            values = ", ".join(item["evidence_values"])
            evidence = f"seen with {len(item['evidence_values'])} {item['evidence_type']} values ({values})"
        lines.append(
            f"  {item['identifier']} ({where}): {evidence}; marked at {item['at']} by message {item['message_id']}"
        )
    print("\n".join(_shown(line) for line in lines))


# -- stats -----------------------------------------------------------------------------------------


@app.command()
def stats(
    space: Annotated[
        str | None,
        typer.Option(
            "--space", envvar="IDSTITCH_SPACE", metavar="NAME", help="One space (default: every space)."
        ),
    ] = None,
    as_json: JsonPerSpaceOption = False,
    store: StoreOption = DEFAULT_STORE_URL,
    config: ConfigOption = None,
) -> None:
    """Counts per space: profiles, accounts, identifiers, merges, events, unresolved, suspect, dropped."""
    with _user_errors():
        settings = load_config(config)
        with _store(store, read_only=True) as opened:
            names = [_space_for_reading(settings, opened, space)] if space else opened.spaces()
            counts = [opened.stats(name).as_dict() for name in names]
            if as_json:
                print(json.dumps(counts[0] if space else counts, indent=2))
                return
            if not counts:
                print("no spaces yet (run `idstitch ingest FILE`)")
                return
            blocks = []
            for item in counts:
                rows = [f"space {item['space']}"]
                rows += [f"  {key:<12}{value:>12,}" for key, value in item.items() if key != "space"]
                blocks.append("\n".join(rows))
            print("\n\n".join(blocks))


# -- keys ------------------------------------------------------------------------------------------


@app.command()
def keys(
    space: Annotated[
        str | None,
        typer.Option(
            "--space",
            envvar="IDSTITCH_SPACE",
            metavar="NAME",
            help="One space (default: every configured one).",
        ),
    ] = None,
    as_json: JsonPerSpaceOption = False,
    store: StoreOption = DEFAULT_STORE_URL,
    config: ConfigOption = None,
) -> None:
    """The write key of each source and the Profile API tokens of each space, generated ones included."""
    from idstitch.engine import Engine

    with _user_errors():
        settings = load_config(config)
        if space is not None:
            settings.space(space)  # unknown space: a ConfigError naming the configured ones
        with _store(store, read_only=True) as opened:
            # A read-only engine accepts exactly the tokens `serve` accepts; it creates nothing.
            engine = Engine(opened, settings, read_only=True)
            names = [space] if space is not None else sorted(settings.spaces)
            documents = [_keys_document(engine, name) for name in names]
        if as_json:
            print(json.dumps(documents[0] if space is not None else documents, indent=2))
            return
        blocks = []
        for document in documents:
            pairs = [
                (
                    f"source {item['name']}",
                    "write key "
                    + (item["write_key"] or "(none yet: the next `idstitch ingest` or `serve` makes it)"),
                )
                for item in document["sources"]
            ]
            pairs += [(f"{item['kind']} token", item["token"]) for item in document["tokens"]]
            if not document["tokens"]:
                # Without a config the first run makes them; one killed before that has made none yet.
                missing = (
                    "none yet: the next `idstitch ingest` or `serve` makes them"
                    if settings.implicit
                    else "none (profile_tokens / admin_tokens in the config)"
                )
                pairs.append(("tokens", missing))
            width = max(len(label) for label, _ in pairs)
            rows = [f"space {document['space']}", *(f"  {label:<{width}}  {text}" for label, text in pairs)]
            blocks.append("\n".join(rows))
        print("\n\n".join(blocks))


def _keys_document(engine: Engine, space: str) -> dict[str, Any]:
    """One space's sources with their write keys and its Profile API tokens (kind read or admin)."""
    configured = engine.config.space(space)
    stored = {source.name: source.write_key for source in engine.store.sources() if source.space == space}
    # A configured key wins: it is what the store holds once `ingest` or `serve` has started with it.
    sources = [
        {"name": name, "write_key": item.write_key or stored.get(name), "merge": item.merge}
        for name, item in sorted(configured.sources.items())
    ]
    candidates = [*configured.profile_tokens, *configured.admin_tokens]
    candidates += [token.token for token in engine.store.tokens() if token.space == space]
    tokens = []
    for text in dict.fromkeys(candidates):
        record = engine.token(text)
        if record is not None and record.space == space:
            tokens.append({"kind": record.kind, "token": record.token})
    tokens.sort(key=lambda item: (item["kind"] != "read", item["token"]))
    return {"space": space, "sources": sources, "tokens": tokens}


# -- migrate ---------------------------------------------------------------------------------------


@app.command()
def migrate(store: StoreOption = DEFAULT_STORE_URL) -> None:
    """Bring the store's schema up to this version of idstitch, and do nothing else (see Upgrading)."""
    # `ingest`, `serve` and `worker` migrate on start too; this is for an upgrade done on its own (by the
    # role that owns the PostgreSQL tables, say) before the application's processes start again.
    from idstitch.storage.base import MigratedStore
    from idstitch.storage.urls import redact_url

    with _user_errors():
        shown = redact_url(store)
        with _store(store) as opened:
            if not isinstance(opened, MigratedStore) or opened.migrated_from is None:
                raise UsageError(f"store {shown} lives in this process only: it has no schema to migrate")
            before, after = opened.migrated_from, opened.schema_version()
        if before == 0:
            print(f"store {shown} created at schema version {after}")
        elif before == after:
            print(f"store {shown} is at schema version {after}, this build's: nothing to migrate")
        else:
            print(f"store {shown} migrated from schema version {before} to {after}")


# -- copy ------------------------------------------------------------------------------------------


@app.command("copy")
def copy_store(
    to: Annotated[
        str,
        typer.Option(
            "--to",
            metavar="URL",
            help="Store to copy into (postgresql://…, or a new sqlite:///file.db); made and migrated if need be.",
        ),
    ],
    space: Annotated[
        list[str] | None,
        typer.Option(
            "--space",
            metavar="NAME",
            help="A space to copy; repeat for several (default: every space stored).",
        ),
    ] = None,
    batch_size: BatchSizeOption = 1000,
    quiet: QuietOption = False,
    as_json: JsonSummaryOption = False,
    store: StoreOption = DEFAULT_STORE_URL,
    config: ConfigOption = None,
) -> None:
    """Copy the store into another (SQLite to PostgreSQL, say): every stored message, resolved again in
    the order it was stored, and the write keys and tokens; the source store is only read."""
    from idstitch.engine import Engine
    from idstitch.storage.urls import in_memory, redact_url

    with _user_errors():
        settings = load_config(config)
        if in_memory(to):
            raise UsageError(f"--to {to} is a store in memory: the copy would vanish when the command ends")
        if _same_store(store, to):
            raise UsageError(f"--to names the store copied from ({redact_url(to)}): name another store")
        with _store(store, read_only=True) as source, ExitStack() as stack:
            names = _spaces_to_copy(settings, source, space)
            target = stack.enter_context(_store(to))
            started = time.monotonic()
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
            tallies = {name: _Tally() for name in names}
            try:
                # Read first (a resumed copy of millions walks a while), written only once it is accepted.
                resumed = _copied_before(source, target, names, redact_url(to))
                before = {name: source.stats(name) for name in names}
                _copy_access(source, target, names)
                engine = Engine(target, settings, outage_wait=_OUTAGE_WAIT_SECONDS)
                _print_created_write_keys(engine)  # a source store without tokens (from IDSTITCH_*)
                _freeze_startup_objects()
                _copy_spaces(
                    engine,
                    source,
                    tallies,
                    resumed,
                    batch_size,
                    sum(item.events for item in before.values()),
                    quiet,
                )
            except (KeyboardInterrupt, _Terminated) as stop:
                copied = sum(tally.messages for tally in tallies.values())
                stderr.print(
                    f"interrupted: {_plural(copied, 'message')} copied and kept; run the same command again "
                    "to resume (messages already in the copy are skipped)",
                    soft_wrap=True,
                )
                raise typer.Exit(143 if isinstance(stop, _Terminated) else 130) from None
            finally:
                signal.signal(signal.SIGTERM, previous)
            seconds = time.monotonic() - started
            report = [
                _copy_report(name, tallies[name], source.stats(name), target.stats(name)) for name in names
            ]
        _print_copy_summary(report, redact_url(to), seconds, as_json)


def _same_store(url: str, other: str) -> bool:
    """Whether two store URLs name one store: the same text, or two spellings of one SQLite file."""
    if url == other:
        return True
    paths = [item.removeprefix("sqlite:///") for item in (url, other) if item.startswith("sqlite:///")]
    if len(paths) < 2 or not all(Path(path).exists() for path in paths):
        return False
    return Path(paths[0]).samefile(paths[1])


def _spaces_to_copy(settings: Config, source: Store, asked: list[str] | None) -> list[str]:
    """The spaces a copy takes: those asked for, else every one the store holds; each must be configured,
    as its messages are resolved again under the config's rules."""
    held = source.spaces()
    names = list(dict.fromkeys(asked)) if asked else held
    for name in names:
        if name not in held:
            raise UsageError(
                f"space {name} is not in the store (it holds: {', '.join(held) or 'no space yet'})"
            )
        if name not in settings.spaces:
            raise UsageError(
                f"space {name} is in the store but not in the config: a copy resolves each message again "
                f"under its space's configured rules; configure it (or copy others with --space)"
            )
    if not names:
        raise UsageError("the store holds no space yet: there is nothing to copy")
    return names


def _copied_before(source: Store, target: Store, names: list[str], shown: str) -> dict[str, CopiedBefore]:
    """What the target holds of each space already; a space holding messages the source does not is
    refused before anything is written: the copy would mix two graphs and replace the write keys."""
    from idstitch.ingest.stored import copied_before

    found = {}
    for name in names:
        held = found[name] = copied_before(source, target, name, outage_wait=_OUTAGE_WAIT_SECONDS)
        if held.foreign:
            raise UsageError(
                f"space {name} of {shown} already holds {_plural(held.foreign, 'message')} that the store "
                f"copied from does not (the first: {held.first_foreign}); a copy goes into a space of its "
                "own, so that two graphs do not mix: name another --to (a new file, or another PostgreSQL "
                "database or schema), or leave that space out with --space"
            )
    return found


def _copy_access(source: Store, target: Store, names: list[str]) -> None:
    """The copy answers the write keys and tokens the source answers, so clients keep working after the
    switch; written before the engine starts, which would otherwise make new ones on a first run."""
    for name in names:
        target.ensure_space(name)
    for record in source.sources():
        if record.space in names:
            target.upsert_source(record)
    for token in source.tokens():
        if token.space in names:
            target.upsert_token(token)


def _copy_spaces(
    engine: Engine,
    source: Store,
    tallies: dict[str, _Tally],
    resumed: dict[str, CopiedBefore],
    group_size: int,
    total: int,
    quiet: bool,
) -> None:
    """Every stored message of each space through the engine of the copy, in stored order, after those an
    earlier run copied; rejections are listed on stderr as `space: message id (sequence N): reason`."""
    from idstitch.ingest.stored import drops_differing, read_stored_groups

    progress = Progress(
        TextColumn("{task.description}", style="progress.description", markup=False),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.completed:,.0f} / {task.total:,.0f} messages"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        disable=quiet or not _stderr_is_a_terminal(),
    )
    with progress:
        task = progress.add_task("copy", total=max(total, 1))
        for name, tally in tallies.items():
            started = time.monotonic()
            held = resumed[name]
            tally.messages += held.messages  # already there: counted as the duplicates they would be
            tally.duplicates += held.messages
            progress.advance(task, held.messages)
            groups = read_stored_groups(
                source,
                name,
                group_size=group_size,
                after_sequence=held.after_sequence,
                outage_wait=_OUTAGE_WAIT_SECONDS,
            )
            for group in groups:
                try:
                    results = engine.ingest_group(group.batches)
                except ConfigError as error:
                    raise UsageError(
                        f"{error}: a message of space {name} was stored from that source; configure it so that "
                        "its policy applies in the copy (what was copied before is kept)"
                    ) from None
                tally.batches += 1
                resolved: list[str] = []
                for placed, result in zip(group.placed, results, strict=True):
                    for outcome in result.outcomes:
                        tally.count(outcome)
                        message_id, sequence, profile_id, account_id = placed[outcome.index]
                        if outcome.status == "rejected":
                            stderr.print(
                                f"{name}: {message_id} (sequence {sequence}): {outcome.error}", soft_wrap=True
                            )
                        elif outcome.status != "duplicate":
                            # Where the source put it: another place is a rules change (or another order).
                            resolved.append(message_id)
                            tally.moved += (outcome.profile_id, outcome.account_id) != (
                                profile_id,
                                account_id,
                            )
                if resolved:
                    tally.drops_differ += drops_differing(
                        source, engine.store, name, resolved, outage_wait=_OUTAGE_WAIT_SECONDS
                    )
                progress.advance(task, group.messages)
            tally.seconds = time.monotonic() - started


def _copy_report(name: str, tally: _Tally, held: SpaceStats, copied: SpaceStats) -> dict[str, Any]:
    """One space's copy: what happened to its messages and whether the copy's graph counts as the source's."""
    source_counts, copy_counts = held.as_dict(), copied.as_dict()
    differences = [key for key in source_counts if source_counts[key] != copy_counts[key]]
    return {
        "space": name,
        **tally.counts(),
        "seconds": round(tally.seconds, 3),
        "source": source_counts,
        "copy": copy_counts,
        "moved": tally.moved,
        "drops_differ": tally.drops_differ,
        "same": not differences and not tally.moved and not tally.drops_differ,
        "differences": differences,
    }


def _print_copy_summary(report: list[dict[str, Any]], to: str, seconds: float, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"to": to, "seconds": round(seconds, 3), "spaces": report}))
        return
    for item in report:
        counts = item["copy"]
        print(
            f"space {item['space']}: {_plural(item['messages'], 'message')} copied to {to} "
            f"({item['accepted'] + item['unresolved']:,} new, {item['duplicates']:,} already there, "
            f"{item['rejected']:,} rejected) in {item['seconds']:.2f} s"
        )
        figures = ", ".join(
            f"{_plural(counts[key], key.rstrip('s'), key)}" for key in counts if key != "space"
        )
        if item["same"]:
            print(f"  the copy holds what the source holds: {figures}")
            continue
        said = []
        if item["moved"]:
            said.append(f"{_plural(item['moved'], 'message')} resolved to another profile or account")
        if item["drops_differ"]:
            said.append(
                f"{_plural(item['drops_differ'], 'message')} dropped other identifiers, or by other rules"
            )
        said += [f"{key} {item['source'][key]:,} there, {counts[key]:,} here" for key in item["differences"]]
        shown = "; ".join(said)
        stderr.print(
            f"warning: space {item['space']}: the copy differs from the source ({shown}). The copy resolved "
            "every stored message under the rules configured now; the source was resolved under the rules "
            "in force when each message arrived, or it was written to during the copy (run it again to "
            "copy what is new), or (a PostgreSQL source with several writers) resolved in another order",
            soft_wrap=True,
        )


# -- simulate / accuracy ---------------------------------------------------------------------------


@app.command()
def simulate(
    out: Annotated[
        Path,
        typer.Option("--out", metavar="FILE", help="NDJSON file to write (.gz: gzip).", dir_okay=False),
    ],
    people: Annotated[
        int | None,
        typer.Option("--people", min=1, metavar="N", help="People in the population (8 messages each)."),
    ] = None,
    messages: Annotated[
        int | None,
        typer.Option("--messages", min=1, metavar="N", help="Messages to write (default: 8 per person)."),
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", metavar="S", help="The same seed always writes the same bytes.")
    ] = 1,
    days: Annotated[int, typer.Option("--days", min=1, metavar="D", help="Time span of the messages.")] = 90,
    truth: Annotated[
        Path | None,
        typer.Option(
            "--truth",
            metavar="FILE",
            help="Also write the ground truth: message_id,person,account,scenario (.gz: gzip).",
            dir_okay=False,
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Write a simulated customer base's Segment messages over months, with the truth of every message."""
    from idstitch.sim.population import WorkloadConfig, write_ndjson

    with _user_errors():
        if people is None and messages is None:
            raise UsageError("give --people N (or --messages N)")
        for option, path in (("--out", out), ("--truth", truth)):
            # `ingest -` reads standard input; here "-" would quietly become a file of that name.
            if path is not None and str(path) == "-":
                raise UsageError(f"{option} -: simulate writes a file (name one, e.g. events.ndjson.gz)")
        if truth is not None and truth.resolve() == out.resolve():
            raise UsageError("--out and --truth must be different files")
        count = messages if messages is not None else 8 * (people or 0)
        workload = WorkloadConfig(messages=count, seed=seed, days=days, people=people)
        started = time.monotonic()
        written = write_ndjson(out, workload, truth_path=truth)
        seconds = time.monotonic() - started
        population = people if people is not None else max(1, count // 8)
        summary = {
            "messages": written,
            "people": population,
            "seed": seed,
            "days": days,
            "out": str(out),
            "truth": str(truth) if truth is not None else None,
            "seconds": round(seconds, 3),
        }
        if as_json:
            print(json.dumps(summary))
            return
        print(
            f"simulated {_plural(written, 'message')} of {_plural(population, 'person', 'people')} "
            f"over {_plural(days, 'day')} (seed {seed}) "
            f"in {seconds:.1f} s: {out}" + (f", truth {truth}" if truth is not None else "")
        )


@app.command()
def accuracy(
    truth: Annotated[
        Path,
        typer.Option(
            "--truth",
            metavar="FILE",
            help="Ground truth written by `idstitch simulate --truth` (.gz or not).",
            dir_okay=False,
        ),
    ],
    space: SpaceOption = None,
    examples: Annotated[
        int,
        typer.Option(
            "--examples", min=0, max=100, metavar="N", help="Worst over-merges and splits to show per side."
        ),
    ] = 3,
    as_json: JsonOption = False,
    store: StoreOption = DEFAULT_STORE_URL,
    config: ConfigOption = None,
) -> None:
    """Score what the store resolved against the truth, beside a naive merge-on-any-shared-id baseline."""
    from idstitch.sim.accuracy import read_truth
    from idstitch.sim.compare import TruthMismatch, compare_store

    with _user_errors():
        if not truth.is_file():
            raise UsageError(f"{truth}: no such file")
        settings = load_config(config)
        with _store(store, read_only=True) as opened:
            space_name = _space_for_reading(settings, opened, space)
            try:
                known = read_truth(truth)
            except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as error:
                raise UsageError(f"{truth}: not a truth file ({error})") from None
            except ValueError as error:  # read_truth names the file and the line
                raise UsageError(str(error)) from None
            try:
                result = compare_store(
                    opened, space_name, _rules(settings, opened, space_name), known, examples=examples
                )
            except TruthMismatch as error:
                raise UsageError(f"{truth}: {error}") from None
        if as_json:
            print(json.dumps({"truth": str(truth), **result.as_dict()}))
            return
        _render_accuracy(result, truth)


def _score(value: float) -> str:
    """A ratio cut (not rounded) to 4 decimals, so that 0.99996 never shows as a perfect 1.0000."""
    return f"{math.floor(value * 10_000) / 10_000:.4f}"


def _side_by_side(ours: float | int, naive: float | int) -> str:
    if isinstance(ours, float) or isinstance(naive, float):
        return f"{_score(ours)} / {_score(naive)}"
    return f"{ours:,} / {naive:,}"


def _render_accuracy(result: Comparison, truth: Path) -> None:
    ours, naive = result.idstitch, result.baseline
    stdout.print(
        f"accuracy of space {result.space} against {truth}: "
        f"{_plural(ours.messages, 'message')} of {_plural(ours.people, 'person', 'people')}",
        soft_wrap=True,
    )
    # Every column folds, as the profile's do: rich's default cuts what does not fit to "…", and in an
    # 80-column terminal that was figures and scenario names.
    table = Table(title="idstitch vs naive baseline (merge on any shared identifier)", title_justify="left")
    table.add_column("figure", overflow="fold")
    table.add_column("idstitch", justify="right", overflow="fold")
    table.add_column("baseline", justify="right", overflow="fold")
    rows: list[tuple[str, str, str]] = [
        ("pairwise precision", _score(ours.pairs.precision), _score(naive.pairs.precision)),
        ("pairwise recall", _score(ours.pairs.recall), _score(naive.pairs.recall)),
        ("pairwise F1", _score(ours.pairs.f1), _score(naive.pairs.f1)),
        (
            "recall ceiling (linkable pairs / true pairs)",
            _score(ours.recall_ceiling),
            _score(naive.recall_ceiling),
        ),
        ("recall over linkable pairs", _score(ours.linkable_recall), _score(naive.linkable_recall)),
        ("profiles", f"{ours.profiles:,}", f"{naive.profiles:,}"),
        ("over-merged profiles (> 1 person)", f"{ours.over_merged:,}", f"{naive.over_merged:,}"),
        (
            "  through shared devices or junk ids",
            f"{ours.over_merged_caused_by(('shared_device', 'junk_id')):,}",
            f"{naive.over_merged_caused_by(('shared_device', 'junk_id')):,}",
        ),
        ("  people in over-merged profiles", f"{ours.over_merged_people:,}", f"{naive.over_merged_people:,}"),
        ("  messages in another person's profile", f"{ours.foreign:,}", f"{naive.foreign:,}"),
        ("split people (> 1 profile)", f"{ours.split:,}", f"{naive.split:,}"),
        ("  unlinkable from the messages", f"{ours.split_unlinkable:,}", f"{naive.split_unlinkable:,}"),
        ("  messages outside their person's main profile", f"{ours.misplaced:,}", f"{naive.misplaced:,}"),
        (
            f"accounts: precision / recall ({result.accounts.items:,} group calls)",
            f"{_score(result.accounts.pairs.precision)} / {_score(result.accounts.pairs.recall)}",
            f"{_score(result.baseline_accounts.pairs.precision)} / "
            f"{_score(result.baseline_accounts.pairs.recall)}",
        ),
    ]
    for row in rows:
        table.add_row(*row)
    stdout.print(table)

    scenarios = Table(title="by scenario (idstitch / baseline)", title_justify="left")
    for column, justify in (
        ("scenario", "left"),
        ("messages", "right"),
        ("precision", "right"),
        ("recall", "right"),
        ("ceiling", "right"),
        ("over-merged", "right"),
        ("split", "right"),
    ):
        scenarios.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    # A scenario's name is a key to look up (in the truth, in --json): it stays whole on its line.
    scenarios.columns[0].no_wrap = True
    scenarios.columns[0].min_width = max((len(item.scenario) for item in ours.by_scenario), default=0)
    for item in ours.by_scenario:
        other = naive.scenario(item.scenario)
        scenarios.add_row(
            item.scenario,
            f"{item.messages:,}",
            _side_by_side(item.pairs.precision, other.pairs.precision),
            _side_by_side(item.pairs.recall, other.pairs.recall),
            _score(item.recall_ceiling),
            _side_by_side(item.over_merged, other.over_merged),
            _side_by_side(item.split, other.split),
        )
    stdout.print(scenarios)

    lines = ["targets (idstitch, default population and rules):"]
    for target in result.targets:
        shown = _score(target.value) if isinstance(target.value, float) else f"{target.value:,}"
        mark = "met" if target.met else "MISSED"
        lines.append(
            f"  {mark:<6} {target.name} {target.goal}: {shown}"
            + (f"  ({target.note})" if target.note else "")
        )
    lines.append(
        f"counted: {ours.truth_rows:,} truth rows; {ours.repeated:,} retries repeat a messageId and count "
        f"once; {ours.junk_only:,} junk-only messages belong to nobody and are left out; "
        f"{ours.unresolved:,} unresolved messages and {ours.missing:,} not in the store (rejected by "
        f"ingest or never ingested) count as singletons; {ours.extra:,} stored messages are not in the "
        "truth and are ignored"
    )
    lines += _example_lines("idstitch", ours) + _example_lines("baseline", naive, splits=False)
    lines += [
        "definitions: a pair is two messages; precision = pairs put together that are one person / "
        "pairs put together; recall = pairs of one person put together / pairs of one person.",
        "  linkable: two messages of one person joined by a chain of that person's own messages sharing "
        "identifiers (blocked values excluded for idstitch); pairs that are not linkable cannot be "
        "joined from the messages alone, e.g. a visitor who never logs in on a second device.",
        "  by scenario: pairs with at least one message of that scenario; an over-merged profile counts "
        "under the scenarios of the messages that carry an identifier shared by two of its people; a "
        "split person under the scenarios of their messages outside their main profile.",
        f"scored in {result.seconds:.1f} s",
    ]
    print("\n".join(lines))


def _example_lines(side: str, result: Accuracy, *, splits: bool = True) -> list[str]:
    """The worst over-merges (and avoidable splits) of one side, with the identifiers behind them."""
    lines: list[str] = []
    unit = "profile" if side == "idstitch" else "cluster"
    for item in result.over_merge_examples:
        people = ", ".join(f"{name} ({count})" for name, count in item["by_person"].items())
        more = ", ..." if item["people"] > len(item["by_person"]) else ""
        lines.append(
            f"{side} over-merged {unit} {item['profile']}: {item['people']:,} people, "
            f"{item['messages']:,} messages ({people}{more})"
        )
        for bridge in item["bridging_identifiers"]:
            scenarios = ", ".join(bridge["scenarios"])
            lines.append(f"  bridged by {bridge['identifier']} ({bridge['people']:,} people; {scenarios})")
    if splits:
        for item in result.split_examples:
            if not item["avoidable"]:
                continue
            parts = "; ".join(
                f"{part['profile']}: {part['messages']} ("
                + ", ".join(f"{name} {count}" for name, count in part["scenarios"].items())
                + ")"
                for part in item["profiles"]
            )
            lines.append(f"{side} avoidable split of {item['person']}: {parts}")
    return lines


# -- report --------------------------------------------------------------------------------------


@app.command()
def report(
    results: Annotated[
        Path,
        typer.Option(
            "--results", metavar="FILE", help="The results of `idstitch bench all`.", dir_okay=False
        ),
    ] = Path("benchmarks/results.json"),
    out: Annotated[
        Path, typer.Option("--out", metavar="DIR", help="Where REPORT.md and its PNG plots go.")
    ] = Path("benchmarks"),
) -> None:
    """Write REPORT.md with tables and PNG plots from the results of `idstitch bench all`."""
    with _user_errors():
        if not results.is_file():
            raise UsageError(f"{results}: no such file (run `idstitch bench all` first)")
        try:
            data = json.loads(results.read_text(encoding="utf-8"))
        except ValueError as error:
            raise UsageError(f"{results}: not JSON: {error}") from None
        if not isinstance(data, dict) or "benchmarks" not in data:
            raise UsageError(f"{results}: not the output of `idstitch bench all`")
        try:
            import matplotlib  # noqa: F401  # only to say clearly what is missing
        except ImportError:
            raise UsageError("the report's plots need matplotlib: pip install 'idstitch[report]'") from None
        from idstitch.bench.report import write_report

        written = write_report(data, out)
        print(f"wrote {written}")


# -- bench (written elsewhere, optional) ----------------------------------------------------------


def _add_bench() -> None:
    """Register `idstitch bench` when idstitch.bench.cli is part of this build."""
    try:
        module = importlib.import_module("idstitch.bench.cli")
    except ImportError as error:
        if error.name is not None and (
            error.name == "idstitch.bench" or error.name.startswith("idstitch.bench.")
        ):
            return
        raise
    bench_app = getattr(module, "app", None)
    if isinstance(bench_app, typer.Typer):
        app.add_typer(bench_app, name="bench")


def main() -> None:
    """Console script entry point."""
    # The benchmarks import the PostgreSQL, NATS and HTTP clients (~0.3 s): only when they are asked for
    # or listed (no command, --help), not before every `idstitch profile`.
    command = next((argument for argument in sys.argv[1:] if not argument.startswith("-")), None)
    if command in (None, "bench"):
        _add_bench()
    output = sys.stdout
    try:
        app()
    except SystemExit as stop:
        # click ends a command whose reader went away (`idstitch --help | head -1`) with exit 1, and
        # only then puts a wrapper of its own in place of sys.stdout; exit 1 means "not found" here,
        # and a gone reader is no error (see _user_errors).
        if stop.code == 1 and sys.stdout is not output:
            raise SystemExit(0) from None
        raise


if __name__ == "__main__":  # pragma: no cover
    main()
