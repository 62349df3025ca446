"""Names of the Redis pub/sub channels live pages listen on: built here and nowhere else."""

from __future__ import annotations

PREFIX = "vmportal:"
# Every guest's state changes, for staff dashboards.
GUESTS = f"{PREFIX}guests"


def request_channel(request_id: int) -> str:
    """One provisioning request's moves."""
    return f"{PREFIX}request:{request_id}"


def job_channel(job_id: int) -> str:
    """One job's moves and log lines."""
    return f"{PREFIX}job:{job_id}"


def guest_channel(uuid: object) -> str:
    """One guest's state changes and the news of its jobs."""
    return f"{PREFIX}guest:{uuid}"


def owner_channel(user_id: int) -> str:
    """State changes of every guest one user owns, for their dashboard."""
    return f"{PREFIX}owner:{user_id}"
