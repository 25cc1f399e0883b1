"""`python -m agents` (and `orch agent`): run the agent of one host."""

import asyncio
import contextlib
import signal
import tempfile
from pathlib import Path
from typing import Annotated

import prometheus_client
import typer
import uvloop

from agents.drivers.testnode import test_node_uri
from agents.drivers.vm import VmDriver
from agents.runtime import Agent, AgentConfig
from events import logs
from schemas.ids import ID_PATTERN, is_valid_id

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


@app.command()
def main(
    host: Annotated[str, typer.Option(metavar="NAME", help="The host this agent runs")],
    nats: Annotated[str, typer.Option(metavar="URL", envvar="ORCH_NATS_URL",
                                      help="NATS URL")],
    libvirt_uri: Annotated[str, typer.Option(
        "--libvirt", metavar="URI",
        help="libvirt URI; `test` makes a private test:/// hypervisor")] = "qemu:///system",
    bridge: Annotated[str | None, typer.Option(help="Bridge for guest NICs (qemu)")] = None,
    heartbeat: Annotated[float, typer.Option(help="Heartbeat period, seconds")] = 1.0,
    resync: Annotated[float, typer.Option(help="Full resync period, seconds")] = 30.0,
    concurrency: Annotated[int, typer.Option(min=1, help="Jobs applied at once")] = 8,
    metrics_port: Annotated[int | None, typer.Option(
        help="Serve Prometheus metrics on 127.0.0.1:PORT")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error")] = "info",
) -> None:
    """Run the agent of one host until SIGTERM or Ctrl-C (JSON logs on stderr)."""
    if not is_valid_id(host):
        typer.echo(f"error: invalid host name {host!r}: must match {ID_PATTERN}", err=True)
        raise typer.Exit(2)
    logs.configure(log_level, json=True)
    if metrics_port is not None:
        prometheus_client.start_http_server(metrics_port, addr="127.0.0.1")
    with contextlib.ExitStack() as cleanup:
        uri = libvirt_uri
        if libvirt_uri == "test":  # its node file lives as long as the agent
            scratch = cleanup.enter_context(tempfile.TemporaryDirectory(prefix=f"orch-{host}-"))
            uri = test_node_uri(host, Path(scratch))
        _run(AgentConfig(nats, host, uri, heartbeat_s=heartbeat, resync_s=resync,
                         concurrency=concurrency), bridge)


def _run(config: AgentConfig, bridge: str | None) -> None:
    def driver() -> VmDriver:
        guest = None
        if config.libvirt_uri.startswith("qemu"):
            from agents.guest import build_guest_image  # reads the kernel: only for qemu

            guest = build_guest_image()
        return VmDriver(config.libvirt_uri, config.host, guest=guest, bridge=bridge)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await Agent(config, driver).run(stop)

    uvloop.run(run())


if __name__ == "__main__":
    app()
