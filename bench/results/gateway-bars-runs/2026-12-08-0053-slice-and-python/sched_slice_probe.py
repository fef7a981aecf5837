"""Ask the kernel for a shorter scheduler slice (EEVDF, Linux 6.12+) and read it back.

python sched_slice_probe.py NANOSECONDS     (as root, and as nobody via setpriv)
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys

libc = ctypes.CDLL(None, use_errno=True)
SYS_SCHED_SETATTR, SYS_SCHED_GETATTR = 314, 315  # x86_64


def read_attr(pid: int = 0) -> dict[str, int]:
    buf = ctypes.create_string_buffer(56)
    if libc.syscall(SYS_SCHED_GETATTR, pid, buf, 56, 0):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    size, policy, flags, nice, _prio, runtime, _deadline, _period = struct.unpack(
        "IIQiIQQQ", buf.raw[:48]
    )
    return {"size": size, "policy": policy, "flags": flags, "nice": nice, "runtime": runtime}


def set_slice(ns: int, pid: int = 0) -> None:
    attr = struct.pack("IIQiIQQQII", 56, 0, 0, 0, 0, ns, 0, 0, 0, 0)
    if libc.syscall(SYS_SCHED_SETATTR, pid, ctypes.c_char_p(attr), 0):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


if __name__ == "__main__":
    print(os.getuid(), read_attr())
    set_slice(int(sys.argv[1]))
    print(read_attr())
