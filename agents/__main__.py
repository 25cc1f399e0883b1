"""`python -m agents` (and `orch agent`): run the agent of one host."""

import asyncio
import contextlib
import ipaddress
import signal
import tempfile
from enum import StrEnum
from pathlib import Path
from typing import Annotated, NoReturn

import prometheus_client
import typer
import uvloop

from agents.drivers.lb import BgpConfig, LbDriver
from agents.drivers.migration import DEFAULT_MIGRATION_URI, MigrationTarget
from agents.drivers.netns_guest import NetnsGuestDriver
from agents.drivers.network import NetworkDriver
from agents.drivers.testnode import test_node_uri
from agents.drivers.vm import VmDriver
from agents.net.host import interface_address
from agents.runtime import Agent, AgentConfig, Driver
from events import logs
from schemas.ids import ID_PATTERN, is_valid_id


class Guests(StrEnum):
    libvirt = "libvirt"
    netns = "netns"

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


@app.command()
def main(
    host: Annotated[str, typer.Option(metavar="NAME", help="The host this agent runs")],
    nats: Annotated[str, typer.Option(metavar="URL", envvar="ORCH_NATS_URL",
                                      help="NATS URL")],
    libvirt_uri: Annotated[str, typer.Option(
        "--libvirt", metavar="URI",
        help="libvirt URI; `test` makes a private test:/// hypervisor")] = "qemu:///system",
    bridge: Annotated[str | None, typer.Option(
        help="One flat bridge for every guest NIC (qemu), instead of their segments")] = None,
    guests: Annotated[Guests, typer.Option(
        help="libvirt: guests are libvirt domains (--libvirt); netns: each guest is a network"
             " namespace with a veth per NIC and a TCP/UDP service answering its id (real"
             " networking, no VM: for broad and fast tests)")] = Guests.libvirt,
    netns: Annotated[str | None, typer.Option(
        metavar="NAME", help="The host's network namespace [default: the agent's own]")] = None,
    underlay_ip: Annotated[str | None, typer.Option(
        metavar="IP", help="This host's VTEP address on the underlay")] = None,
    underlay_dev: Annotated[str | None, typer.Option(
        metavar="IFACE", help="...or the interface whose IPv4 address it is")] = None,
    lb: Annotated[bool, typer.Option(
        "--lb", help="This host is an LB node: it serves load balancers (nftables, health"
                     " checks, BGP with --bgp-peer) and no instances; needs the underlay"
                     " address")] = False,
    bgp_peer: Annotated[str | None, typer.Option(
        metavar="IP", help="--lb: the upstream router to announce the VIPs to by BGP"
                           " (bird2) [default: no announcement]")] = None,
    bgp_peer_asn: Annotated[int, typer.Option(metavar="ASN", help="The router's AS")] = 65000,
    bgp_asn: Annotated[int, typer.Option(metavar="ASN", help="This LB node's AS")] = 65001,
    bgp_router_id: Annotated[str | None, typer.Option(
        metavar="IP", help="This node's BGP router id [default: its underlay address]")] = None,
    migration_uri: Annotated[str, typer.Option(
        metavar="TEMPLATE", help="A live migration's destination libvirtd, from its underlay"
                                 " {address} (and {host}, its name)")] = DEFAULT_MIGRATION_URI,
    heartbeat: Annotated[float, typer.Option(help="Heartbeat period, seconds")] = 1.0,
    resync: Annotated[float, typer.Option(help="Full resync period, seconds")] = 30.0,
    concurrency: Annotated[int, typer.Option(min=1, help="Jobs applied at once")] = 8,
    metrics_port: Annotated[int | None, typer.Option(
        help="Serve Prometheus metrics on 127.0.0.1:PORT")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error")] = "info",
) -> None:
    """Run the agent of one host until SIGTERM or Ctrl-C (JSON logs on stderr)."""
    if not is_valid_id(host):
        _usage(f"invalid host name {host!r}: must match {ID_PATTERN}")
    if underlay_ip is not None and underlay_dev is not None:
        _usage("--underlay-ip and --underlay-dev: give one")
    if underlay_dev is not None:
        try:
            underlay_ip = interface_address(netns, underlay_dev)
        except (OSError, LookupError) as exc:
            _usage(f"--underlay-dev {underlay_dev}: {exc}")
    if underlay_ip is not None:
        try:
            underlay_ip = str(ipaddress.IPv4Address(underlay_ip))
        except ValueError:
            _usage(f"--underlay-ip {underlay_ip!r} is not an IPv4 address")
    if guests is Guests.netns and underlay_ip is None:
        _usage("--guests netns: give the host's --underlay-ip or --underlay-dev")
    if lb and underlay_ip is None:
        _usage("--lb: give the node's --underlay-ip or --underlay-dev")
    try:
        MigrationTarget(migration_uri)
    except ValueError as exc:
        _usage(f"--migration-uri: {exc}")
    if bgp_peer is not None and not lb:
        _usage("--bgp-peer: only an LB node (--lb) announces VIPs")
    bgp = None
    if bgp_peer is not None:
        try:
            bgp = BgpConfig(str(ipaddress.IPv4Address(bgp_peer)), bgp_peer_asn, bgp_asn,
                            str(ipaddress.IPv4Address(bgp_router_id or underlay_ip)))
        except ValueError as exc:
            _usage(f"--bgp-peer/--bgp-router-id: {exc}")
    logs.configure(log_level, json=True)
    if metrics_port is not None:
        prometheus_client.start_http_server(metrics_port, addr="127.0.0.1")
    with contextlib.ExitStack() as cleanup:
        uri = libvirt_uri
        if libvirt_uri == "test":  # its node file lives as long as the agent
            scratch = cleanup.enter_context(tempfile.TemporaryDirectory(prefix=f"orch-{host}-"))
            uri = test_node_uri(host, Path(scratch))
        _run(AgentConfig(nats, host, uri, heartbeat_s=heartbeat, resync_s=resync,
                         concurrency=concurrency, underlay_ip=underlay_ip), guests, netns,
             bridge, lb, bgp, migration_uri)


def _usage(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _run(config: AgentConfig, guests: Guests, netns: str | None, bridge: str | None,
         lb: bool, bgp: BgpConfig | None, migration_uri: str = DEFAULT_MIGRATION_URI) -> None:
    def drivers() -> dict[str, Driver]:
        """One driver per kind of job: the guests (or, on an LB node, the balancers), and
        their networks' segments."""
        found: dict[str, Driver] = {}
        if config.underlay_ip is not None:
            found["network"] = NetworkDriver(config.underlay_ip, netns)
        if lb:
            assert config.underlay_ip is not None
            found["lb"] = LbDriver(config.host, config.underlay_ip, netns, bgp=bgp)
            return found
        if guests is Guests.netns:
            assert config.underlay_ip is not None
            found["instance"] = NetnsGuestDriver(netns, config.host, config.underlay_ip)
            return found
        guest = None
        if config.libvirt_uri.startswith("qemu"):
            from agents.guest import build_guest_image  # reads the kernel: only for qemu

            guest = build_guest_image()
        ports = None
        if config.underlay_ip is not None and bridge is None:
            from agents.net.ports import PortPlumbing  # taps land in the host's namespace

            ports = PortPlumbing(netns)
        found["instance"] = VmDriver(config.libvirt_uri, config.host, guest=guest,
                                     bridge=bridge, ports=ports,
                                     underlay_ip=config.underlay_ip if ports else None,
                                     netns=netns, migration_uri=migration_uri)
        return found

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await Agent(config, drivers).run(stop)

    uvloop.run(run())


if __name__ == "__main__":
    app()
