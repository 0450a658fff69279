#!/usr/bin/python3
"""A scripted TCP peer (scapy) for tests/peers.rs: sequences a real peer cannot produce on
demand, played against a real kernel socket that accepts one connection and closes it at
once (so it sends the first FIN).

Usage: peer.py SCENARIO IFACE PEER_MAC SRC DST SPORT DPORT

Runs in the client's namespace, whose kernel must not answer the server's segments with
resets of its own (the test drops those on output; this script sends on the link layer,
below that rule). Prints one line per step; exits non-zero when the server does not
answer as TCP says it must.
"""

import sys
import time

from scapy.all import IP, TCP, AsyncSniffer, Ether, Raw, conf, sendp

conf.verb = 0
scenario, iface, mac, src, dst = sys.argv[1:6]
sport, dport = int(sys.argv[6]), int(sys.argv[7])
got = []
# Filtered in Python: the kernel's filter compiler needs libpcap, which scapy may lack.
sniffer = AsyncSniffer(
    iface=iface,
    lfilter=lambda p: TCP in p
    and IP in p
    and p[IP].src == dst
    and p[TCP].sport == dport
    and p[TCP].dport == sport,
    prn=got.append,
    store=False,
)
sniffer.start()
time.sleep(0.5)


def send(flags, seq, ack, payload=b""):
    p = Ether(dst=mac) / IP(src=src, dst=dst) / TCP(
        sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=65535
    )
    sendp(p / Raw(payload) if payload else p, iface=iface)


def wait_for(what, pred, timeout=3.0):
    end = time.time() + timeout
    while time.time() < end:
        for p in list(got):
            if pred(p[TCP]):
                print(what, flush=True)
                return p[TCP]
        time.sleep(0.005)
    sys.exit(f"no {what} from the server")


isn = 1_000_000
send("S", isn, 0)
synack = wait_for("SYN-ACK", lambda t: t.flags.S and t.flags.A)
server = synack.seq + 1
send("A", isn + 1, server)
fin = wait_for("FIN", lambda t: t.flags.F)
after_fin = fin.seq + 1

if scenario == "abort_on_data_in_fin_wait1":
    # Data that does not acknowledge the FIN reaches the closed socket in FIN_WAIT1.
    send("PA", isn + 1, server, b"late data")
    wait_for("RST", lambda t: t.flags.R)
elif scenario == "reset_in_time_wait":
    # The FIN acknowledged with ours in one segment: TIME_WAIT at once; then a reset.
    send("FA", isn + 1, after_fin)
    wait_for("ACK of our FIN", lambda t: t.flags.A and t.ack == isn + 2)
    time.sleep(0.3)
    send("R", isn + 2, 0)
elif scenario == "fin_in_the_same_bucket":
    # The FIN acknowledged (an orphan's timewait socket in FIN_WAIT2), our FIN right after
    # (TIME_WAIT, its timer re-armed into the same timer-wheel bucket — 2 s wide at 60 s —
    # so no timer event); then a reset, after the test looked at sock_diag.
    send("A", isn + 1, after_fin)
    send("FA", isn + 1, after_fin)
    wait_for("ACK of our FIN", lambda t: t.flags.A and t.ack == isn + 2)
    time.sleep(0.6)
    send("R", isn + 2, 0)
elif scenario == "crossing_fins":
    # Our FIN before we acknowledge theirs: both FINs cross; then the acknowledgement.
    send("FA", isn + 1, server)
    wait_for("ACK of our FIN", lambda t: t.flags.A and t.ack == isn + 2)
    send("A", isn + 2, after_fin)
    time.sleep(0.2)
else:
    sys.exit(f"unknown scenario {scenario}")
sniffer.stop()
print("done", flush=True)
