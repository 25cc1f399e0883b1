"""The `orch` application and its global options; each verb module registers on ``app``."""

import os
from dataclasses import dataclass
from typing import Annotated

import typer

from events import logs
from orchestrator.settings import resolve

app = typer.Typer(
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
        return self.nats or os.environ.get("ORCH_NATS_URL") or resolve(self.nats, self.pg).nats_url

    def pg_dsn(self) -> str:
        return self.pg or os.environ.get("ORCH_PG_DSN") or resolve(self.nats, self.pg).pg_dsn


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
    # Verbs that run daemons log JSON at their own level; the others keep stdout for their
    # output and say only what goes wrong (a lost connection, say) on stderr.
    logs.configure("warning", json=False)
