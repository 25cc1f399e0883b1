"""A node file for libvirt's test:/// driver: one private, in-memory hypervisor per agent."""

from pathlib import Path

NODE_XML = """<node>
  <cpu>
    <nodes>1</nodes><sockets>1</sockets><cores>{vcpus}</cores><threads>1</threads>
    <active>{vcpus}</active><mhz>2000</mhz><model>x86_64</model><vendor>orch</vendor>
  </cpu>
  <memory>{memory_kib}</memory>
</node>
"""


def test_node_uri(host: str, directory: Path, vcpus: int = 64,
                  memory_mib: int = 262144) -> str:
    """Write a node file for ``host`` in ``directory`` and return its test:/// URI."""
    path = directory / f"{host}.xml"
    path.write_text(NODE_XML.format(vcpus=vcpus, memory_kib=memory_mib * 1024))
    return f"test://{path.resolve()}"
