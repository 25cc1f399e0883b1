"""Where the bus and the database are: flags, then environment, then the `orch up` stack file."""

import os
from dataclasses import dataclass
from pathlib import Path

from orchestrator.embedded import read_stack_file

STACK_DIR_ENV = "ORCH_HOME"
DEFAULT_STACK_DIR = Path(".orch")


class NoStack(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class Endpoints:
    nats_url: str
    pg_dsn: str


def stack_dir() -> Path:
    return Path(os.environ.get(STACK_DIR_ENV, DEFAULT_STACK_DIR))


def resolve(nats_url: str | None = None, pg_dsn: str | None = None) -> Endpoints:
    nats_url = nats_url or os.environ.get("ORCH_NATS_URL")
    pg_dsn = pg_dsn or os.environ.get("ORCH_PG_DSN")
    if nats_url and pg_dsn:
        return Endpoints(nats_url, pg_dsn)
    info = read_stack_file(stack_dir())
    if info is None:
        raise NoStack(
            "no stack found: run `orch up`, or set ORCH_NATS_URL and ORCH_PG_DSN"
        )
    return Endpoints(nats_url or info.nats_url, pg_dsn or info.pg_dsn)
