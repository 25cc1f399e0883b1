"""The `orch` application and its global options; each verb module registers on ``app``."""

from __future__ import annotations

import contextlib
import enum
import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Annotated, Any

import typer
import typer.core

if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec

    from orchestrator.settings import Endpoints

WAIT_MODES = ("outcome", "applied")


def wait_argument(argv: list[str]) -> list[str]:
    """`publish --wait` takes an optional word (`--wait` or `--wait applied`), which click
    cannot parse: spell it `--wait=outcome` or `--wait=applied` for it. Other verbs' words
    (`orch agent` passes its own on) are left alone."""
    if "publish" not in argv:
        return argv
    start = argv.index("publish") + 1
    out = argv[:start]
    i = start
    while i < len(argv):
        if argv[i] == "--":
            return out + argv[i:]
        if argv[i] == "--wait":
            mode = argv[i + 1] if i + 1 < len(argv) and argv[i + 1] in WAIT_MODES else None
            out.append(f"--wait={mode or 'outcome'}")
            i += 2 if mode else 1
            continue
        out.append(argv[i])
        i += 1
    return out


_PLAIN = (str, int, float, bool)  # types click parses by itself


def _parses_alone(annotation: Any) -> bool:
    """A number or an enum (a choice): its own constructor takes argv's str."""
    return annotation in (int, float) or (isinstance(annotation, type)
                                          and issubclass(annotation, enum.Enum))


def _coerce_lazily() -> None:
    """typer (0.29) coerces each parameter through a pydantic TypeAdapter that it builds on
    first use, even an option left unset, a value already of its annotated type, or a
    number without bounds or a choice given as a str: importing pydantic and building them
    cost every verb ~70 ms, and a replica (its `--deadline` is a float) ~4 MB for good.
    Those need nothing; any other value, or one they refuse, goes through typer's own
    coercion, built when first needed. A typer without it is left alone."""
    build = getattr(typer.core, "build_runtime_param", None)
    if build is None:
        return
    from typer._coercion import RuntimeParam

    @dataclass(frozen=True)
    class Lazy(RuntimeParam):
        descriptor: Any = None
        built: list[Any] = field(default_factory=list)

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            if self.annotation in _PLAIN and type(value) is self.annotation:
                return value
            info = self.parameter_info
            if (type(value) is str and _parses_alone(self.annotation)
                    and getattr(info, "min", None) is None and getattr(info, "max", None) is None):
                with contextlib.suppress(ValueError):  # else typer's coercion says what is wrong
                    return self.annotation(value)
            if not self.built:
                self.built.append(build(self.descriptor))
            return self.built[0]._coerce_value(value, param=param, ctx=ctx)

    def lazy(d: Any) -> Any:
        if d.file_annotation is not None:
            return build(d)
        return Lazy(d.parameter_info, d.annotation, d)

    typer.core.build_runtime_param = lazy


_coerce_lazily()


class _Orch(typer.Typer):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not args and "args" not in kwargs:
            kwargs["args"] = wait_argument(sys.argv[1:])
        return super().__call__(*args, **kwargs)


app = _Orch(
    name="orch",
    help="Event-sourced cloud orchestrator: publish commands, inspect state and timelines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click errors: a usage error stays short, without a box drawn around it.
    rich_markup_mode=None,
)


@dataclass(frozen=True, slots=True)
class Options:
    nats: str | None
    pg: str | None

    def nats_url(self) -> str:
        # Only what this verb needs: publishing must not require a database setting.
        return self.nats or os.environ.get("ORCH_NATS_URL") or self._stack().nats_url

    def pg_dsn(self) -> str:
        return self.pg or os.environ.get("ORCH_PG_DSN") or self._stack().pg_dsn

    def _stack(self) -> Endpoints:
        from orchestrator.settings import resolve  # the `orch up` stack's file, if any

        return resolve(self.nats, self.pg)


@app.callback()
def main(
    ctx: typer.Context,
    nats_url: Annotated[str | None, typer.Option(
        "--nats", metavar="URL", help="NATS URL [env ORCH_NATS_URL, else the `orch up` stack]",
    )] = None,
    pg_dsn: Annotated[str | None, typer.Option(
        "--pg", metavar="DSN", help="PostgreSQL DSN [env ORCH_PG_DSN, else the `orch up` stack]",
    )] = None,
) -> None:
    ctx.obj = Options(nats_url, pg_dsn)
    # Set up when structlog is first imported: a verb that reads PostgreSQL only never loads
    # it (~50 ms), and one that does has it set up before anything can log.
    if "structlog" in sys.modules:
        _quiet_logs()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport("structlog", _quiet_logs))


def _quiet_logs() -> None:
    """Verbs that run daemons log JSON at their own level; the others keep stdout for their
    output and say only what goes wrong (a lost connection, say) on stderr."""
    from events import logs

    if hasattr(logs, "configure"):  # else events.logs is importing structlog: a daemon's
        logs.configure("warning", json=False)  # verb imported it, and sets logs up itself


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``then`` right after the module ``name`` is first imported, by whichever import."""

    def __init__(self, name: str, then: Callable[[], None]) -> None:
        self.name, self.then = name, then

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once: the real finders find it
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            load(module)
            self.then()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec
