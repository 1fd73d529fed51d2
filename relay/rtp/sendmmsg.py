"""Fast fan-out: Linux sendmmsg(2) through ctypes, one system call for every destination of one
packet (the call releases the GIL). `SENDMMSG` is None where libc lacks it: callers then loop
over `sendto`. A `DestTable` holds the precomputed addresses and message headers for one
destination list, all pointing at one packet buffer, so a send builds nothing."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import socket
import struct
import sys
from typing import Any


class SockaddrIn(ctypes.Structure):
    _fields_ = [("family", ctypes.c_ushort), ("port", ctypes.c_uint16),
                ("addr", ctypes.c_uint32), ("zero", ctypes.c_char * 8)]


class Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class Msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                ("iov", ctypes.POINTER(Iovec)), ("iovlen", ctypes.c_size_t),
                ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", Msghdr), ("len", ctypes.c_uint)]


def _load_sendmmsg() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sendmmsg
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


SENDMMSG = _load_sendmmsg()
MMSG_SIZE = ctypes.sizeof(Mmsghdr)
MAX_BATCH = 1024  # UIO_MAXIOV: the kernel takes at most this many messages per call
MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
BUFFER_FULL = {errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS}  # the send buffer is full


class DestTable:
    """Precomputed `sockaddr_in` + `mmsghdr` arrays for one destination list and one buffer."""

    def __init__(self, dests: list[tuple[str, int]], iov: Iovec) -> None:
        n = len(dests)
        self.n = n
        self.addrs = (SockaddrIn * max(n, 1))()
        self.msgs = (Mmsghdr * max(n, 1))()
        iov_ptr = ctypes.pointer(iov)
        for i, (host, port) in enumerate(dests):
            a = self.addrs[i]
            a.family = socket.AF_INET
            a.port = socket.htons(port)
            a.addr = struct.unpack("=I", socket.inet_aton(host))[0]
            h = self.msgs[i].hdr
            h.name = ctypes.addressof(a)
            h.namelen = ctypes.sizeof(SockaddrIn)
            h.iov = iov_ptr
            h.iovlen = 1
        self.base = ctypes.addressof(self.msgs)
