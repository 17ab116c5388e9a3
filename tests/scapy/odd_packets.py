#!/usr/bin/python3
"""Send frames the Airlock parser must refuse, from a patient host.

Usage: odd_packets.py IFACE SRC_MAC DST_MAC SRC_IP DST_IP SRC_IP6 DST_IP6 ARP_TARGET COUNT

Each kind is sent COUNT times; prints one JSON object {kind: expected_reason}.
Run inside the patient host's network namespace (ip netns exec NS ...).
Uses Debian's python3-scapy.
"""
import json
import sys

from scapy.all import ARP, GRE, ICMP, IP, IPOption_NOP, TCP, UDP, Dot1Q, Dot1AD, Ether, IPv6, IPv6ExtHdrHopByHop, IPv6ExtHdrFragment, IPv6ExtHdrRouting, Raw, sendp, conf  # noqa: E501

conf.verb = 0


def main() -> None:
    iface, smac, dmac, src, dst, src6, dst6, arp_target, count = sys.argv[1:10]
    count = int(count)
    eth = Ether(src=smac, dst=dmac)
    tcp = TCP(sport=40000, dport=443, flags="S")
    frames = {
        "vlan": (eth / Dot1Q(vlan=7) / IP(src=src, dst=dst) / tcp, "drop_vlan"),
        "qinq": (eth / Dot1AD(vlan=7) / Dot1Q(vlan=8) / IP(src=src, dst=dst) / tcp, "drop_vlan"),
        "ethertype": (Ether(src=smac, dst=dmac, type=0x88B5) / Raw(b"\x00" * 46), "drop_ethertype"),
        "ipv4_options": (eth / IP(src=src, dst=dst, options=[IPOption_NOP()] * 4) / tcp, "drop_ipv4_options"),
        "fragment_first": (eth / IP(src=src, dst=dst, flags="MF", frag=0) / tcp, "drop_fragment"),
        "fragment_later": (eth / IP(src=src, dst=dst, frag=185) / Raw(b"x" * 40), "drop_fragment"),
        "ipv6_hop_by_hop": (eth / IPv6(src=src6, dst=dst6) / IPv6ExtHdrHopByHop() / tcp, "drop_ipv6_ext"),
        "ipv6_routing": (eth / IPv6(src=src6, dst=dst6) / IPv6ExtHdrRouting() / tcp, "drop_ipv6_ext"),
        "ipv6_fragment": (eth / IPv6(src=src6, dst=dst6) / IPv6ExtHdrFragment() / tcp, "drop_fragment"),
        "gre": (eth / IP(src=src, dst=dst) / GRE() / IP(src=src, dst=dst) / UDP(), "drop_l4_proto"),
        # Short frames are padded to 60 bytes on the way, so truncation is
        # shown with headers that claim more than the frame holds.
        "truncated_ipv4": (eth / IP(src=src, dst=dst, len=400) / tcp, "drop_truncated"),
        "truncated_ipv6": (eth / IPv6(src=src6, dst=dst6, plen=400) / tcp, "drop_truncated"),
        "arp_not_for_us": (eth / ARP(op=1, psrc=src, pdst=arp_target, hwsrc=smac), "drop_arp"),
        "icmp_timestamp": (eth / IP(src=src, dst=dst) / ICMP(type=13), "drop_no_flow"),
    }
    expected = {}
    for kind, (frame, reason) in frames.items():
        sendp(frame, iface=iface, count=count)
        expected[kind] = reason
    print(json.dumps(expected))


if __name__ == "__main__":
    main()
