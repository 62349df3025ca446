"""Fixtures for the hypervisor layer: a held test-driver connection, throwaway guests, cleanup."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from provisioning.hypervisor import Hypervisor
from tests.support.domains import Cleanup, domain_xml, new_uuid
from tests.support.libvirt import TEST_URI


@pytest.fixture(scope="session")
def test_hv() -> Iterator[Hypervisor]:
    """One test-driver connection held for the session, so the driver keeps its state."""
    hv = Hypervisor(TEST_URI)
    hv.connection()
    yield hv
    hv.close()


@pytest.fixture
def cleanup(test_hv: Hypervisor) -> Iterator[Cleanup]:
    tracker = Cleanup(test_hv)
    yield tracker
    tracker.run()


@pytest.fixture
def make_guest(test_hv: Hypervisor, cleanup: Cleanup) -> Callable[..., tuple[str, str]]:
    """Factory: a fresh uuid and test-driver XML for it, cleaned up after the test."""

    def make(**kwargs: object) -> tuple[str, str]:
        uuid = cleanup.add(new_uuid())
        return uuid, domain_xml(uuid=uuid, **kwargs)  # type: ignore[arg-type]

    return make
