"""What every verb shares: exit codes, errors as one line, the console, JSON lines, and
running an async verb with every expected failure mapped to an exit code.

Every verb pays for what `orch` imports before it runs: the verb modules import only typer
and these light helpers at the top, and what a verb needs (nats, asyncpg, rich, the
deciders) inside the verb itself."""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import msgspec
import typer

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

T = TypeVar("T")
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
EXIT_TIMEOUT = 124  # as timeout(1): the wait ran out before everything it waited for


class CliError(Exception):
    """Reported as one `error: ...` line, then the process exits with ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


def console() -> Console:
    from rich.console import Console

    out = Console(highlight=False)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        # Piped: no colours (rich decides), and no 80-column wrapping of long lines either.
        out = Console(highlight=False, width=240)
    return out


_json = msgspec.json.Encoder()


def _surely_piped() -> bool:
    """Whether rich's Console would find stdout no terminal, told without importing rich
    (~30 ms of a process): not a TTY, and no TTY_COMPATIBLE or FORCE_COLOR saying otherwise.
    False means: ask rich."""
    try:
        tty = sys.stdout.isatty()
    except (AttributeError, ValueError):  # no stdout, or a closed one: rich says no terminal
        tty = False
    return not tty and not os.environ.get("TTY_COMPATIBLE") and "FORCE_COLOR" not in os.environ


class Lines:
    """The lines of a long listing: rich renders them on a TTY; on a pipe, where it would
    only drop the styles, their plain text is written at once (a timeline may have 10,000),
    and rich is not even imported."""

    def __init__(self, follow: bool = False) -> None:
        """``follow``: each line is flushed as it comes, for whoever reads them live."""
        self.out = None if _surely_piped() else console()
        self.terminal = self.out is not None and self.out.is_terminal
        self.follow = follow
        if not follow and not self.terminal and hasattr(sys.stdout, "reconfigure"):
            # Written when 8 KB are pending, not line by line: with PYTHONUNBUFFERED (-u)
            # each line was a system call, 30,000 of them 65 ms to a pipe instead of 11.
            sys.stdout.reconfigure(write_through=False)

    def text(self, line: Text) -> None:
        if self.terminal:
            assert self.out is not None
            self.out.print(line, soft_wrap=True)
        else:
            self.plain(line.plain)

    def plain(self, line: str) -> None:
        sys.stdout.write(line + "\n")
        if self.follow:
            sys.stdout.flush()

    def json(self, doc: Any) -> None:
        self.plain(self.encode(doc))

    @staticmethod
    def encode(doc: Any) -> str:
        return _json.encode(doc).decode()


def fail(message: str, code: int) -> NoReturn:
    line = " ".join(message.split())  # one line, whatever the exception text held
    sys.stdout.flush()  # what was written before it comes first
    print(f"error: {line}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


def print_json(doc: Any) -> None:
    """One compact JSON document on its own line (msgspec: Structs and dicts alike)."""
    sys.stdout.write(_json.encode(doc).decode() + "\n")
    sys.stdout.flush()


def list_rows(rows: list[T], as_json: bool, as_doc: Callable[[T], Any],
              table: Callable[[list[T]], Any], empty: str) -> None:
    """A listing verb's output: one JSON object per row, or a table, or one line if empty."""
    if as_json:
        for row in rows:
            print_json(as_doc(row))
    elif rows:
        console().print(table(rows))
    else:
        print(empty, flush=True)


def run(main: Callable[[], Coroutine[Any, Any, int | None]], folds: bool = False) -> None:
    """Run an async verb; map every expected failure to one error line and an exit code.

    ``folds``: the verb folds a history again, making many objects that live until it
    ends; collecting less often saves a third of its time, and what the imports made is
    never garbage."""
    import uvloop

    if folds:
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
    try:
        code = uvloop.run(main())
    except CliError as exc:
        fail(str(exc), exc.code)
    except Exception as exc:  # connection lost, server refusal, a bug: still one line
        if _is(exc, "schemas.codec", "CommandError"):
            fail(str(exc), EXIT_USAGE)
        if _is(exc, "orchestrator.settings", "NoStack"):
            fail(str(exc), EXIT_FAILURE)
        if _is(exc, "asyncpg", "UndefinedTableError"):
            fail("no projection in this database yet: start `orch orchestrator` first",
                 EXIT_FAILURE)
        if os.environ.get("ORCH_DEBUG"):
            raise
        fail(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, EXIT_FAILURE)
    raise typer.Exit(code or EXIT_OK)


def _is(exc: Exception, module: str, name: str) -> bool:
    """Whether ``exc`` is ``module.name``, without importing it: a verb that never imported
    the module cannot have raised its exception."""
    found = sys.modules.get(module)
    return found is not None and isinstance(exc, getattr(found, name))
