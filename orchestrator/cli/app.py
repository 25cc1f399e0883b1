"""The `orch` application and its global options; each verb module registers on ``app``."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
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
    from events import logs

    ctx.obj = Options(nats_url, pg_dsn)
    # Verbs that run daemons log JSON at their own level; the others keep stdout for their
    # output and say only what goes wrong (a lost connection, say) on stderr.
    logs.configure("warning", json=False)
