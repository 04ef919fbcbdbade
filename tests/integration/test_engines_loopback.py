"""The checks the engine tests rely on to stay on loopback: the socket census from /proc, the image
server naming itself without DNS, and Ray's node address forced to loopback even when ray was
imported first (its own environment check happens only at import)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from support.engines import Socket, decode_address, off_loopback, parse_proc_net, sockets_of
from support.imageserver import ImageServer

TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 101 1 0 100 0 0 10 0
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 102 1 0 100 0 0 10 0
   2: 0100007F:A000 08080808:0050 01 00000000:00000000 00:00000000 00000000     0        0 103 1 0 100 0 0 10 0
   3: 0100007F:A001 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 104 1 0 100 0 0 10 0
"""
TCP6 = """  sl  local_address                         remote_address                        st
   0: 00000000000000000000000001000000:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 201 1
   1: 0000000000000000FFFF00000100007F:1F92 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 202 1
   2: 00000000000000000000000000000000:1F93 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 203 1
"""


def test_proc_net_addresses_are_decoded() -> None:
    assert decode_address("0100007F:1F90") == ("127.0.0.1", 8080)
    assert decode_address("00000000000000000000000001000000:1F91") == ("::1", 8081)
    assert decode_address("0000000000000000FFFF00000100007F:0050") == ("::ffff:7f00:1", 80)  # 127.0.0.1 mapped


def test_census_flags_wildcard_listeners_and_outside_peers() -> None:
    inodes = {101: 1, 102: 1, 103: 2, 104: 2, 201: 3, 202: 3, 203: 3}
    socks = parse_proc_net(TCP, "tcp", inodes) + parse_proc_net(TCP6, "tcp6", inodes)
    assert len(socks) == 7 and sum(s.listening for s in socks) == 5
    bad = off_loopback(socks)
    assert [(s.local, s.remote) for s in bad] == [
        (("0.0.0.0", 22), ("0.0.0.0", 0)),
        (("127.0.0.1", 40960), ("8.8.8.8", 80)),
        (("::", 8083), ("::", 0)),
    ]
    assert off_loopback([Socket(1, "udp", ("127.0.0.1", 5), ("0.0.0.0", 0), "07")]) == []


def test_census_sees_this_process_listening(server) -> None:
    port = server.server_address[1]
    mine = [s for s in sockets_of({os.getpid()}) if s.listening and s.local == ("127.0.0.1", port)]
    assert len(mine) == 1


def test_image_server_names_itself_without_dns(monkeypatch) -> None:
    """http.server would look 127.0.0.2 up with getfqdn: a reverse DNS query to the resolver."""

    def no_dns(*_: object) -> str:
        raise AssertionError("reverse DNS lookup")

    monkeypatch.setattr(socket, "getfqdn", no_dns)
    srv = ImageServer("127.0.0.2")
    assert srv.server_name == "127.0.0.2"
    srv.server_close()


def test_ray_node_address_is_loopback_even_if_ray_came_first() -> None:
    pytest.importorskip("ray", reason="the [ray] extra is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    code = (
        "import ray\n"  # reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER (unset here) now
        "from ray._private import ray_constants, services\n"
        "assert ray_constants.ENABLE_RAY_CLUSTER\n"
        "from similarity.engines.local import prepare_ray\n"
        "prepare_ray()\n"
        "print(services.get_node_ip_address())\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "127.0.0.1"
