"""`orch`: the command line of the orchestrator, one module per group of verbs.

Human output by default (rich tables, colours only on a TTY), ``--json`` for scripts.
Exit codes: 0 ok, 1 not found / verify failed / runtime failure, 2 invalid input or usage,
124 a wait that ran out. Errors are one line on stderr, ``error: ...``; set ORCH_DEBUG=1
for the traceback instead.
"""

# Each module registers its verbs on `app` when imported; the order is `orch --help`'s.
from orchestrator.cli import entities, moves, publish, replay, stack, timelines
from orchestrator.cli.app import app

__all__ = ["app", "entities", "moves", "publish", "replay", "stack", "timelines"]
