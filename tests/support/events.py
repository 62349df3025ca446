"""An inbox for what an EventListener delivers: lifecycle events and connection states."""

from __future__ import annotations

import queue

from provisioning.hypervisor import LifecycleEvent

DEADLINE = 10.0


class Inbox:
    """Events collected by a listener, awaited with a deadline."""

    def __init__(self) -> None:
        self.events: queue.Queue[LifecycleEvent] = queue.Queue()
        self.states: queue.Queue[bool] = queue.Queue()

    def __call__(self, event: LifecycleEvent) -> None:
        self.events.put(event)

    def expect(
        self, uuid: str, event: str, detail: str | None = None, timeout: float = DEADLINE
    ) -> LifecycleEvent:
        """The next event for uuid matching event (and detail); others are skipped."""
        try:
            while True:
                got = self.events.get(timeout=timeout)
                if got.uuid == uuid and got.event == event and detail in (None, got.detail):
                    return got
        except queue.Empty:
            raise AssertionError(f"no {event}/{detail} event for {uuid} in {timeout} s") from None

    def expect_state(self, connected: bool, timeout: float = DEADLINE) -> None:
        try:
            while self.states.get(timeout=timeout) is not connected:
                pass
        except queue.Empty:
            raise AssertionError(f"listener never reported connected={connected}") from None
