"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractUser
from django.test import Client

from tests.support.browser import browser, page  # noqa: F401 - fixtures for every folder
from tests.support.stack import RedisServer

# Playwright's sync API runs an event loop in the test thread; the ORM calls the tests make around
# it are still plain synchronous code.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

PASSWORD = "correct-horse-battery-staple"


@pytest.fixture
def make_user(db: None):
    def make(username: str = "alice", *, staff: bool = False) -> AbstractUser:
        return get_user_model().objects.create_user(
            username=username, password=PASSWORD, is_staff=staff
        )

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
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own, which it may stop."""
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def superuser_client(db: None) -> Client:
    admin = get_user_model().objects.create_superuser(username="admin", password=PASSWORD)
    client = Client()
    client.force_login(admin)
    return client


class Stack:
    """The portal's processes running against this test's database and Redis."""

    def __init__(self, redis_server: RedisServer, libvirt_uri: str) -> None:
        from tests.support import stack

        self.redis = redis_server
        self.env = stack.process_env(redis_url=redis_server.url, LIBVIRT_URI=libvirt_uri)
        self.procs: dict[str, stack.Proc] = {}
        self.base_url = ""
        self._stack = stack

    def start(self, *parts: str) -> Stack:
        s = self._stack
        for part in parts:
            if part == "web":
                self.procs["web"], self.base_url = s.start_web(self.env)
            elif part == "worker":
                self.procs["worker"] = s.start_worker(self.env)
            elif part == "beat":
                self.procs["beat"] = s.start_beat(self.env)
            elif part == "listener":
                self.procs["listener"] = s.start_listener(self.env)
            else:
                raise ValueError(part)
        return self

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.stop()


def point_celery_at(url: str) -> None:
    """Send this process's tasks to the broker at url (the app caches its connections)."""
    from kombu import pools

    from vmportal.celery import app

    app.conf.broker_url = url
    # The app's pools are kombu's process-wide ones, kept per broker URL. Closing one but leaving
    # it registered made a later test whose Redis got the same port (or the suite's own Redis,
    # pointed at again) fail with "Acquire on closed pool": close them all and forget them.
    pools.reset()
    app._pool = None
    app.amqp._producer_pool = None


@pytest.fixture
def stack(transactional_db: None, own_redis: RedisServer, settings) -> Iterator[Stack]:
    """Starts nothing by itself: call .start('web', 'worker', 'beat', 'listener') as needed."""
    from vmportal.celery import app

    settings.REDIS_URL = own_redis.url
    settings.LIBVIRT_URI = "test+unix:///default"
    previous = app.conf.broker_url
    point_celery_at(own_redis.url)
    running = Stack(own_redis, settings.LIBVIRT_URI)
    yield running
    running.stop()
    point_celery_at(previous)
