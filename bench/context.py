"""What every benchmark gets: the seeded rows, the running stack, and a list of things to remove."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.stack import PASSWORD, Seed, Stack
from bench.web import Session


def remove_domain(hv: Any, uuid: str) -> None:
    """Destroy and undefine a domain and delete the pool volumes its disks use."""
    from provisioning.hypervisor import domxml, operations, storage
    from provisioning.hypervisor.errors import NotFound

    volumes: list[tuple[str, str]] = []
    with contextlib.suppress(NotFound):
        root = domxml.parse_untrusted(operations.get_xml(hv, uuid, inactive=True))
        for source in root.iterfind("devices/disk[@device='disk']/source"):
            if source.get("pool") and source.get("volume"):
                volumes.append((str(source.get("pool")), str(source.get("volume"))))
            elif source.get("file"):
                volumes.append(("", str(source.get("file"))))
    operations.destroy(hv, uuid)
    operations.undefine(hv, uuid)
    for pool, volume in volumes:
        if pool:
            storage.delete_volume(hv, pool, volume)
        else:
            _delete_volume_by_path(hv, volume)


def _delete_volume_by_path(hv: Any, path: str) -> None:
    import libvirt

    def run(conn: Any) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            conn.storageVolLookupByPath(path).delete(0)

    hv.call(run)


@dataclass
class Made:
    """Domains and files the benchmarks made, removed at the end (or when one is done with)."""

    domains: dict[str, set[str]] = field(default_factory=dict)
    files: set[Path] = field(default_factory=set)

    def domain(self, uri: str, uuid: str) -> None:
        self.domains.setdefault(uri, set()).add(uuid)

    def file(self, path: Path) -> None:
        self.files.add(path)

    def remove(self, uri: str, uuid: str) -> None:
        """Remove one domain now (and forget it)."""
        from provisioning.hypervisor.connection import get_hypervisor

        remove_domain(get_hypervisor(uri), uuid)
        self.domains.get(uri, set()).discard(uuid)

    def remove_all(self, log: Callable[[str], None]) -> None:
        from provisioning.hypervisor.connection import get_hypervisor
        from provisioning.hypervisor.errors import HypervisorError

        def remove(uri: str, uuid: str) -> None:
            try:
                remove_domain(get_hypervisor(uri), uuid)
            except HypervisorError as exc:
                log(f"cleanup: could not remove {uuid} on {uri}: {exc}")

        # libvirtd serves several calls per connection at once; hundreds of domains go faster.
        with ThreadPoolExecutor(4) as pool:
            for uri, uuids in self.domains.items():
                list(pool.map(lambda uuid, uri=uri: remove(uri, uuid), sorted(uuids)))
                uuids.clear()
        for path in self.files:
            path.unlink(missing_ok=True)
        self.files.clear()


@dataclass
class Context:
    """The seeded rows, the stack, run counts and the cleanup list."""

    seed: Seed
    stack: Stack
    quick: bool
    domain_type: str
    log: Callable[[str], None]
    made: Made = field(default_factory=Made)
    sessions: dict[str, Session] = field(default_factory=dict)

    def session(self, username: str) -> Session:
        """An HTTP client logged in as one of the seeded users (each login hashes a password)."""
        if username not in self.sessions:
            self.sessions[username] = Session(self.stack.base_url).log_in(username, PASSWORD)
        return self.sessions[username].clone()

    def runs(self, quick: int, full: int) -> int:
        return quick if self.quick else full


def elapsed_since(start: float) -> float:
    """Seconds since a time.monotonic() reading."""
    return time.monotonic() - start
