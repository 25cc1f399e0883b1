"""The fabric of the tests: hosts as network namespaces on an underlay bridge.

It lives in `orchestrator.fabric` (so that `orch demo` can use it: the CLI may not import
`tests/`); this module re-exports it for the tests that import it from here.
"""

from orchestrator.fabric import (
    GUEST_RUN_DIR,
    NETNS_DIR,
    UNDERLAY_MTU,
    Fabric,
    FabricHost,
    _alive,
    _used_networks,
    free_underlay,
    in_netns,
    netns_socket,
    unavailable,
)

__all__ = ["GUEST_RUN_DIR", "NETNS_DIR", "UNDERLAY_MTU", "Fabric", "FabricHost", "_alive",
           "_used_networks", "free_underlay", "in_netns", "netns_socket", "unavailable"]
