"""Errors of the network dataplane; ``transient`` says whether retrying can help."""

from __future__ import annotations

import errno
import os


class NetError(Exception):
    """A failure of a network operation on one host."""

    transient = True


class TransientNetError(NetError):
    """Worth retrying: no answer in time, a race with another writer, a missing link."""


class PermanentNetError(NetError):
    """Cannot succeed as asked: invalid input, an object that is not ours in the way."""

    transient = False


# Errnos after which the same request cannot succeed by itself.
_PERMANENT = frozenset({errno.EINVAL, errno.EPERM, errno.EACCES, errno.EOPNOTSUPP,
                        errno.ERANGE, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT})


class NetlinkError(OSError):
    """The kernel refused a netlink request: its errno, what was asked, the kernel's text."""

    def __init__(self, code: int, what: str, text: str = "") -> None:
        detail = f"{os.strerror(code)}" + (f" ({text})" if text else "")
        super().__init__(code, f"{what}: {detail}")
        self.what = what

    def __str__(self) -> str:
        return str(self.strerror)

    @property
    def permanent(self) -> bool:
        return self.errno in _PERMANENT


def classify(exc: NetlinkError) -> NetError:
    """The dataplane error a netlink refusal becomes."""
    kind = PermanentNetError if exc.permanent else TransientNetError
    return kind(str(exc))
