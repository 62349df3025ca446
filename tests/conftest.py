"""Fixtures shared by the whole suite: users and clients, Redis, the portal's processes, and a
host with a kernel template on this test process's own libvirt test driver."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import pytest
from django.contrib.auth.models import AbstractUser
from django.test import Client, override_settings

from provisioning.hypervisor import operations, storage
from provisioning.hypervisor.connection import Hypervisor, get_hypervisor
from provisioning.models import Guest, GuestTemplate, Host
from provisioning.services.provision.spec import data_volume, seed_volume, system_volume
from tests import factories
from tests.support.browser import browser, page  # noqa: F401 - fixtures for every folder
from tests.support.libvirt import TEST_POOL, TEST_URI
from tests.support.netns import netns_host  # noqa: F401 - a fixture for every test
from tests.support.stack import RedisServer, Stack, point_celery_at

# Playwright's sync API runs an event loop in the test thread; the ORM calls the tests make around
# it are still plain synchronous code.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


@pytest.fixture(autouse=True, scope="session")
def quick_password_hashes() -> Iterator[None]:
    """Users made by tests get hashes that cost nothing to make (tests/support/hashers.py)."""
    with override_settings(PASSWORD_HASHERS=["tests.support.hashers.QuickPBKDF2PasswordHasher"]):
        yield


@pytest.fixture
def make_user(db: None) -> Callable[..., AbstractUser]:
    """factories.make_user, with a database."""

    def make(username: str = "alice", **kwargs: object) -> AbstractUser:
        return factories.make_user(username, **kwargs)  # type: ignore[arg-type]

    return make


@pytest.fixture
def user(make_user) -> AbstractUser:
    return make_user("alice")


@pytest.fixture
def staff(make_user) -> AbstractUser:
    return make_user("root-admin", staff=True)


@pytest.fixture
def user_client(user: AbstractUser) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def staff_client(staff: AbstractUser) -> Client:
    client = Client()
    client.force_login(staff)
    return client


@pytest.fixture
def superuser_client(db: None) -> Client:
    client = Client()
    client.force_login(factories.make_user("admin", superuser=True))
    return client


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own, which it may stop."""
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def stack(transactional_db: None, own_redis: RedisServer, settings) -> Iterator[Stack]:
    """Starts nothing by itself: call .start('web', 'worker', 'beat', 'listener') as needed."""
    from vmportal.celery import app

    settings.REDIS_URL = own_redis.url
    settings.LIBVIRT_URI = TEST_URI
    previous = app.conf.broker_url
    point_celery_at(own_redis.url)
    running = Stack(own_redis, settings.LIBVIRT_URI)
    yield running
    running.stop()
    point_celery_at(previous)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Real-QEMU tests run one at a time, in one process (`--dist loadgroup`): their guests are
    emulated (TCG) and take a core each, and side by side they missed their own deadlines. Two
    such processes run side by side, about equally long (11 minutes each in CI on 2 cores, the
    Debian image cached), so the run's tail is not their sum: the engine's, the pages'
    and the API's on one; the images' and the hypervisor layer's on the other (the Debian
    image's build and its boot to SSH, which waits minutes on cloud-init with deadlines to
    match, the tiny guest's own boots, the demo's registration, and libvirt driven directly)."""
    images = ("tests/demo/", "tests/management/", "tests/hypervisor/")
    for item in items:
        if not item.get_closest_marker("qemu"):
            continue
        where = item.nodeid
        if item.get_closest_marker("debian") or where.startswith(images):
            item.add_marker(pytest.mark.xdist_group("images"))
        else:
            item.add_marker(pytest.mark.xdist_group("qemu"))


# --- a host on the test driver ---------------------------------------------------------------


def test_hv() -> Hypervisor:
    """This process's connection to its own test driver."""
    return get_hypervisor(TEST_URI)


def remove_guests_of(host: Host) -> None:
    """Destroy and undefine the domains of every guest on the host, and delete their disks."""
    hv = get_hypervisor(host.uri)
    for guest in Guest.objects.filter(host=host):
        uuid = str(guest.uuid)
        with contextlib.suppress(Exception):
            operations.destroy(hv, uuid)
            operations.undefine(hv, uuid)
        for volume in (system_volume(guest), data_volume(guest), seed_volume(guest)):
            with contextlib.suppress(Exception):
                storage.delete_volume(hv, TEST_POOL, volume)


@pytest.fixture
def test_host(transactional_db: None, settings) -> Iterator[Host]:
    """The local host on this process's test driver, with room to spare and the driver's pool.

    Transactional, so processes a test starts see its rows. Domains the test made are removed
    afterwards, with the disks of its guests.
    """
    settings.LIBVIRT_URI = TEST_URI
    hv = test_hv()  # held open, so the driver keeps its state between calls
    before = {d.uuid for d in operations.list_domains(hv)}
    # Memory to spare: reconcile counts the driver's own 8 GiB "test" domain against the host.
    host = factories.make_host("local", uri=TEST_URI, roomy=False, capacity_memory_mib=1 << 20)
    yield host
    remove_guests_of(host)
    for info in operations.list_domains(hv):
        if info.uuid not in before:
            operations.destroy(hv, info.uuid)
            operations.undefine(hv, info.uuid)


@pytest.fixture
def kernel_template(test_host: Host) -> GuestTemplate:
    """A direct-kernel-boot install template on the test host (paths the driver never reads)."""
    return factories.make_template(name="Tiny (test driver)", host=test_host)
