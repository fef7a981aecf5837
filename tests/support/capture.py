"""What a capture on the host network sees: TCP payloads to and from some addresses'
port, read from a raw packet socket (AF_PACKET, as tcpdump reads them; needs root or
CAP_NET_RAW on the Docker host, which is where the tests run).

Packets are tapped as they reach or leave an interface, before Docker's NAT rewrites
them, so a connection from the gateway to another host's published engine port shows
with that host's address and port.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from types import TracebackType

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800

Flow = tuple[str, int, str, int]  # source address, port, destination address, port


class Capture:
    def __init__(self, interface: str, addrs: set[str], port: int) -> None:
        # One interface: each packet is seen once there, either way (on every
        # interface a packet shows on the container's veth and the bridge both).
        self.interface = interface
        self.addrs = {socket.inet_aton(a) for a in addrs}
        self.port = port
        self.flows: dict[Flow, bytearray] = defaultdict(bytearray)
        self.segments: list[bytes] = []  # each payload alone, in arrival order
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    def __enter__(self) -> Capture:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.bind((self.interface, 0))
        sock.settimeout(0.2)
        self._sock = sock
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close()

    def _run(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                frame = self._sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self._take(frame)

    def _take(self, frame: bytes) -> None:
        if len(frame) < 34 or int.from_bytes(frame[12:14], "big") != ETH_P_IP:
            return
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != socket.IPPROTO_TCP or len(ip) < ihl + 20:
            return
        total = int.from_bytes(ip[2:4], "big")
        src, dst = ip[12:16], ip[16:20]
        tcp = ip[ihl:total]
        sport, dport = int.from_bytes(tcp[0:2], "big"), int.from_bytes(tcp[2:4], "big")
        to_engine = dport == self.port and dst in self.addrs
        from_engine = sport == self.port and src in self.addrs
        if not (to_engine or from_engine):
            return
        payload = bytes(tcp[(tcp[12] >> 4) * 4 :])
        if not payload:
            return
        flow = (socket.inet_ntoa(src), sport, socket.inet_ntoa(dst), dport)
        with self._lock:
            # A retransmission may repeat bytes: harmless for what the tests look for.
            self.flows[flow].extend(payload)
            self.segments.append(payload)

    def stream_bytes(self) -> list[bytes]:
        """Each direction of each connection, its payloads joined in order (a secret
        split across two segments still shows)."""
        with self._lock:
            return [bytes(b) for b in self.flows.values()]

    def wait_for(self, predicate: Callable[[Capture], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.1)
        return False


def tls_records(data: bytes) -> set[int]:
    """TLS record content types at the start of a connection's bytes and after each
    whole record: 22 handshake, 23 application data; empty if the bytes are not TLS."""
    seen: set[int] = set()
    at = 0
    while at + 5 <= len(data):
        kind, major = data[at], data[at + 1]
        if kind not in (20, 21, 22, 23) or major != 3:
            break
        seen.add(kind)
        at += 5 + int.from_bytes(data[at + 3 : at + 5], "big")
    return seen
