"""The gratuitous ARP frame a host sends for a port (`agents.net.announce`), byte by byte.

That guests behind a segment's ports take it from its bridge, and that it never crosses
VXLAN nor teaches a bridge the holder's MAC, is proven against the kernel in
tests/test_network_driver.py.
"""

import pytest

from agents.net.announce import garp_frame


def test_the_frame_is_a_broadcast_arp_request_whose_sender_is_its_target() -> None:
    frame = garp_frame("10.1.2.3", "02:AA:bb:cc:dd:0e", "02:00:00:00:00:b1")
    mac = bytes.fromhex("02aabbccdd0e")
    assert len(frame) == 60  # Ethernet's minimum: padded
    assert frame[0:6] == b"\xff" * 6  # to everyone behind the port
    assert frame[6:12] == bytes.fromhex("0200000000b1")  # from the bridge, not the holder
    assert frame[12:14] == b"\x08\x06"  # ARP
    arp = frame[14:42]
    assert arp[0:2] == b"\x00\x01" and arp[2:4] == b"\x08\x00"  # Ethernet, IPv4
    assert arp[4] == 6 and arp[5] == 4
    assert arp[6:8] == b"\x00\x01"  # a request (RFC 5227's announcement)
    assert arp[8:14] == mac and arp[14:18] == bytes([10, 1, 2, 3])  # sender
    assert arp[18:24] == bytes(6) and arp[24:28] == bytes([10, 1, 2, 3])  # target: itself
    assert frame[42:] == bytes(18)


@pytest.mark.parametrize(("ip", "mac", "source"), [
    ("10.1.2", "02:00:00:00:00:01", "02:00:00:00:00:b1"),
    ("10.1.2.3", "02:00:00:00:01", "02:00:00:00:00:b1"),
    ("10.1.2.3", "02:00:00:00:00:01:02", "02:00:00:00:00:b1"),
    ("10.1.2.3", "02:00:00:00:00:01", "02:00:00:00:b1")])
def test_an_address_or_mac_that_is_not_one_is_refused(ip: str, mac: str, source: str) -> None:
    with pytest.raises(ValueError):
        garp_frame(ip, mac, source)
