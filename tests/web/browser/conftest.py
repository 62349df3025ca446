"""Fixtures of the browser tests on real QEMU: the whole stack on this process's libvirtd, and the
demo template on it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from provisioning.hypervisor.connection import get_hypervisor
from provisioning.services.demo import DEMO_POOL_NAME, demo_seed
from tests.factories import make_host
from tests.support.flows import Demo, remove_qemu_guest
from tests.support.libvirt import QEMU_URI
from tests.support.netns import NetnsHost
from tests.support.stack import RedisServer, Stack, point_celery_at


@pytest.fixture
def qemu_stack(transactional_db: None, own_redis: RedisServer, settings) -> Iterator[Stack]:
    """The `stack` fixture on QEMU_URI with software emulation (KVM hangs here)."""
    from vmportal.celery import app

    settings.REDIS_URL = own_redis.url
    settings.LIBVIRT_URI = QEMU_URI
    settings.VMPORTAL_DOMAIN_TYPE = "qemu"
    previous = app.conf.broker_url
    point_celery_at(own_redis.url)
    running = Stack(own_redis, QEMU_URI)
    running.env["VMPORTAL_DOMAIN_TYPE"] = "qemu"
    try:
        yield running
    finally:
        running.stop()
        point_celery_at(previous)


@pytest.fixture
def demo(qemu_stack: Stack) -> Iterator[Demo]:
    # "local": the host whose queue (hv.local) the stack's worker serves; demo_seed adds its pool.
    host = make_host("local", uri=QEMU_URI, pool=None)
    made = Demo(get_hypervisor(QEMU_URI), demo_seed(host=host, log=lambda _line: None))
    try:
        yield made
    finally:
        for name in made.names:
            remove_qemu_guest(made.hv, name, DEMO_POOL_NAME)


@pytest.fixture
def netns_stack(
    transactional_db: None, own_redis: RedisServer, settings, netns_host: NetnsHost
) -> Iterator[Stack]:
    """The stack on the namespaced libvirtd, with software emulation (KVM hangs here)."""
    from vmportal.celery import app

    settings.REDIS_URL = own_redis.url
    settings.LIBVIRT_URI = netns_host.uri
    settings.VMPORTAL_DOMAIN_TYPE = "qemu"
    previous = app.conf.broker_url
    point_celery_at(own_redis.url)
    running = Stack(own_redis, netns_host.uri)
    running.env["VMPORTAL_DOMAIN_TYPE"] = "qemu"
    try:
        yield running
    finally:
        running.stop()
        point_celery_at(previous)
