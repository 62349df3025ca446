"""Exceptions callers act on, classified from libvirtError by libvirt's symbolic error codes.

Callers catch the class, never parse messages:

- ``NotFound``: the domain/volume/pool/network is not there (destroy/undefine treat it as done).
- ``WrongState``: the object exists but is in a state where the call cannot apply. libvirt's
  QEMU driver says OPERATION_INVALID; the test driver says INTERNAL_ERROR for the same thing, so
  an INTERNAL_ERROR is only turned into WrongState by ``operations`` after re-reading the
  domain's state and finding the operation cannot apply to it (see ``operations._explain``).
- ``Busy``: a job or the guest agent holds the domain; retry later.
- ``InvalidConfig``: the XML or an argument is wrong; retrying the same call is pointless.
- ``AlreadyExists``: a name or UUID clash; look the existing object up instead.
- ``Unsupported``: this driver lacks the call or flag (the test driver lacks many).
- ``ConnectionLost``: the connection broke; reconnect and re-read before acting again.
  ``Unreachable`` (a ConnectionLost) means it could not be opened at all, or auth failed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

import libvirt

P = ParamSpec("P")
R = TypeVar("R")


class HypervisorError(Exception):
    """A libvirt failure, with libvirt's error code and domain kept for logs."""

    def __init__(self, message: str, *, code: int | None = None, domain: int | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.domain = domain

    @property
    def code_name(self) -> str:
        """Symbolic name of the libvirt error code ('VIR_ERR_NO_DOMAIN'), or '' if none."""
        return _ERR_NAMES.get(self.code, "") if self.code is not None else ""


class NotFound(HypervisorError):
    """The object is not there."""


class WrongState(HypervisorError):
    """The object is in a state where the operation cannot apply; re-read and decide."""

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        domain: int | None = None,
        state: str | None = None,
    ):
        super().__init__(message, code=code, domain=domain)
        self.state = state


class Busy(HypervisorError):
    """The domain is busy (a job, a timeout, an unresponsive agent); retry later."""


class InvalidConfig(HypervisorError):
    """The XML or an argument is invalid; the same call will fail again."""


class AlreadyExists(HypervisorError):
    """A name or UUID is already taken."""


class Unsupported(HypervisorError):
    """The driver does not implement this call or flag."""


class ConnectionLost(HypervisorError):
    """The connection to libvirt broke; reconnect before going on."""


class Unreachable(ConnectionLost):
    """libvirt could not be reached or refused our credentials."""


def _codes(*names: str) -> frozenset[int]:
    """Error codes by name, skipping ones this libvirt-python lacks."""
    return frozenset(
        value for name in names if isinstance(value := getattr(libvirt, name, None), int)
    )


_ERR_NAMES: dict[int, str] = {
    value: name
    for name in dir(libvirt)
    if name.startswith("VIR_ERR_")
    and isinstance(value := getattr(libvirt, name), int)
    # Error levels share the prefix (VIR_ERR_NONE/WARNING/ERROR); codes win on a clash.
    and name not in ("VIR_ERR_NONE", "VIR_ERR_WARNING", "VIR_ERR_ERROR")
}

NOT_FOUND_CODES = _codes(
    "VIR_ERR_NO_DOMAIN",
    "VIR_ERR_NO_STORAGE_VOL",
    "VIR_ERR_NO_STORAGE_POOL",
    "VIR_ERR_NO_NETWORK",
    "VIR_ERR_NO_DOMAIN_METADATA",
    "VIR_ERR_NO_DOMAIN_SNAPSHOT",
    "VIR_ERR_NO_DOMAIN_CHECKPOINT",
    "VIR_ERR_NO_DOMAIN_BACKUP",
    "VIR_ERR_NO_NODE_DEVICE",
    "VIR_ERR_NO_SECRET",
    "VIR_ERR_NO_INTERFACE",
    "VIR_ERR_NO_NWFILTER",
    "VIR_ERR_NO_NWFILTER_BINDING",
    "VIR_ERR_NO_NETWORK_PORT",
)
WRONG_STATE_CODES = _codes("VIR_ERR_OPERATION_INVALID")
BUSY_CODES = _codes(
    "VIR_ERR_OPERATION_TIMEOUT",
    "VIR_ERR_AGENT_UNRESPONSIVE",
    "VIR_ERR_AGENT_UNSYNCED",
    "VIR_ERR_RESOURCE_BUSY",
)
INVALID_CONFIG_CODES = _codes(
    "VIR_ERR_XML_ERROR",
    "VIR_ERR_XML_DETAIL",
    "VIR_ERR_XML_INVALID_SCHEMA",
    "VIR_ERR_CONFIG_UNSUPPORTED",
    "VIR_ERR_INVALID_ARG",
    "VIR_ERR_CPU_INCOMPATIBLE",
    "VIR_ERR_NO_NAME",
    "VIR_ERR_NO_SOURCE",
    "VIR_ERR_NO_TARGET",
    "VIR_ERR_NO_OS",
    "VIR_ERR_NO_DEVICE",
)
ALREADY_EXISTS_CODES = _codes(
    "VIR_ERR_DOM_EXIST",
    "VIR_ERR_STORAGE_VOL_EXIST",
    "VIR_ERR_NETWORK_EXIST",
    "VIR_ERR_STORAGE_POOL_BUILT",
)
UNSUPPORTED_CODES = _codes("VIR_ERR_NO_SUPPORT", "VIR_ERR_OPERATION_UNSUPPORTED")
CONNECTION_CODES = _codes("VIR_ERR_NO_CONNECT", "VIR_ERR_INVALID_CONN", "VIR_ERR_RPC")
UNREACHABLE_CODES = _codes(
    "VIR_ERR_AUTH_FAILED",
    "VIR_ERR_AUTH_CANCELLED",
    "VIR_ERR_AUTH_UNAVAILABLE",
    "VIR_ERR_UNKNOWN_HOST",
)
# SYSTEM_ERROR and INTERNAL_ERROR mean a broken connection only when the RPC layer or the
# remote driver raised them; from a hypervisor driver they are that driver's own failures.
TRANSPORT_DOMAINS = _codes("VIR_FROM_RPC", "VIR_FROM_REMOTE")
TRANSPORT_CODES = _codes("VIR_ERR_SYSTEM_ERROR", "VIR_ERR_INTERNAL_ERROR")


def classify(exc: libvirt.libvirtError) -> HypervisorError:
    """The HypervisorError subclass instance that stands for a libvirtError."""
    code = exc.get_error_code()
    domain = exc.get_error_domain()
    message = exc.get_error_message() or str(exc)
    cls: type[HypervisorError] = HypervisorError
    if code in NOT_FOUND_CODES:
        cls = NotFound
    elif code in WRONG_STATE_CODES:
        cls = WrongState
    elif code in BUSY_CODES:
        cls = Busy
    elif code in UNREACHABLE_CODES:
        cls = Unreachable
    elif code in CONNECTION_CODES or (code in TRANSPORT_CODES and domain in TRANSPORT_DOMAINS):
        cls = ConnectionLost
    elif code in UNSUPPORTED_CODES:
        cls = Unsupported
    elif code == libvirt.VIR_ERR_INVALID_ARG and "unsupported flags" in message:
        # Drivers reject flags they do not know with INVALID_ARG; that is a missing feature.
        cls = Unsupported
    elif code in INVALID_CONFIG_CODES:
        cls = InvalidConfig
    elif code in ALREADY_EXISTS_CODES or (
        code == libvirt.VIR_ERR_OPERATION_FAILED and "already exists" in message
    ):
        cls = AlreadyExists
    return cls(message, code=code, domain=domain)


@contextmanager
def translating() -> Iterator[None]:
    """Turn any libvirtError raised inside the block into its HypervisorError class."""
    try:
        yield
    except libvirt.libvirtError as exc:
        raise classify(exc) from exc


def translated(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator form of ``translating``."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with translating():
            return fn(*args, **kwargs)

    return wrapper
