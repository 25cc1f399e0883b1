"""The gratuitous ARP frame a host sends for a port (`agents.net.announce`), byte by byte.

That guests take it from a port, and that it never crosses VXLAN, is proven against the
kernel in tests/test_network_driver.py.
"""

import pytest

from agents.net.announce import garp_frame


def test_the_frame_is_a_broadcast_arp_request_whose_sender_is_its_target() -> None:
    frame = garp_frame("10.1.2.3", "02:AA:bb:cc:dd:0e")
    mac = bytes.fromhex("02aabbccdd0e")
    assert len(frame) == 60  # Ethernet's minimum: padded
    assert frame[0:6] == b"\xff" * 6  # to everyone behind the port
    assert frame[6:12] == mac  # from the new holder
    assert frame[12:14] == b"\x08\x06"  # ARP
    arp = frame[14:42]
    assert arp[0:2] == b"\x00\x01" and arp[2:4] == b"\x08\x00"  # Ethernet, IPv4
    assert arp[4] == 6 and arp[5] == 4
    assert arp[6:8] == b"\x00\x01"  # a request (RFC 5227's announcement)
    assert arp[8:14] == mac and arp[14:18] == bytes([10, 1, 2, 3])  # sender
    assert arp[18:24] == bytes(6) and arp[24:28] == bytes([10, 1, 2, 3])  # target: itself
    assert frame[42:] == bytes(18)


@pytest.mark.parametrize(("ip", "mac"), [("10.1.2", "02:00:00:00:00:01"),
                                         ("10.1.2.3", "02:00:00:00:01"),
                                         ("10.1.2.3", "02:00:00:00:00:01:02")])
def test_an_address_or_mac_that_is_not_one_is_refused(ip: str, mac: str) -> None:
    with pytest.raises(ValueError):
        garp_frame(ip, mac)
