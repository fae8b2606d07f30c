#!/usr/bin/env python3
"""Brings the loopback up in each network namespace named on stdin (one name a line, as in
/run/netns). bench.py runs it as a process of its own, so the harness itself never switches
namespaces. This is `ip -n NAME link set lo up` for thousands of namespaces: each `ip -n` process
copies the whole mount table (one entry per namespace) when it starts, so N of them cost O(N^2);
here it is one setns() there and back per namespace.
"""

import ctypes
import fcntl
import os
import socket
import struct
import sys

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFREQ = "16sH22x"  # struct ifreq: name[16], then ifr_flags in a 24-byte union

libc = ctypes.CDLL(None, use_errno=True)


def setns(fd):
    if libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def main():
    home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    done = 0
    for line in sys.stdin:
        name = line.strip()
        if not name:
            continue
        if "/" in name or name in (".", ".."):
            sys.exit(f"lo_up: bad namespace name {name!r}")
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            setns(fd)
            try:
                # A socket belongs to the namespace it is created in; its ioctls act there.
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    req = struct.pack(IFREQ, b"lo", 0)
                    flags = struct.unpack(IFREQ, fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
                    fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack(IFREQ, b"lo", flags | IFF_UP))
            finally:
                try:
                    setns(home)
                except OSError:
                    os._exit(3)  # never carry on in a foreign namespace
        finally:
            os.close(fd)
        done += 1
    print(done)


if __name__ == "__main__":
    main()
