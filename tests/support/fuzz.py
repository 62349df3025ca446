"""Contract fuzzing of /api/v1 with schemathesis against the live web server (uvicorn).

`fuzz_live` seeds rows (factories and services, on the test's database), makes personal tokens
for an owner and a staff user, starts the web server as the portal runs it (rate limit off)
and runs a `Fuzzer` over every operation but the two SSE `/events` streams:

- coverage (optional): schemathesis's deterministic edge cases of every operation
  (boundaries, wrong types, missing fields, other methods, odd content types);
- probes: requests schemathesis does not make (bodies over Django's size limit, too many
  query fields, deep JSON, If-Match and Authorization variants, Idempotency-Key replays,
  following real cursors);
- fuzzing: hypothesis-generated cases of every operation, in positive and in negative data
  generation, in rounds until enough requests were sent.

Every response goes through schemathesis's checks (not_a_server_error, status_code_,
content_type_, response_schema_ and response_headers_conformance). Known ids (the seeded
guests, keys, schedules, jobs...) go into part of the generated requests, so that they reach the
code behind the 404 of an id nobody has. The report counts every request sent and every
failure by check, and keeps the failing requests (method, path, body) with the response's
status and the start of its body.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import hypothesis
import requests
import schemathesis
from django.conf import settings
from django.contrib.auth.models import User
from django.middleware.csrf import get_token
from django.test import Client, RequestFactory
from django.utils import timezone
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.core.result import Err
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from provisioning.models import (
    ApiToken,
    Guest,
    GuestTemplate,
    Host,
    Job,
    JobEvent,
    ProvisioningRequest,
    RebuildSchedule,
    Snapshot,
    SshKey,
)
from provisioning.services import provision, schedules, tokens
from tests import factories
from tests.support.stack import ARTIFACTS, Stack

SCHEMA_PATH = "/api/v1/openapi.json"
# The two SSE endpoints stream until the client leaves: nothing for a request-response fuzzer.
STREAMS = ("GET /api/v1/guests/{uuid}/events", "GET /api/v1/requests/{id}/events")
# Operations only staff may call (404 for anyone else): fuzzed with the staff token.
STAFF_ONLY = frozenset(
    {"GET /api/v1/hosts", "GET /api/v1/hosts/{id}", "POST /api/v1/guests/{uuid}/migrate"}
)
SERVER_ERROR = "not_a_server_error"
CONFORMANCE = (
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
)
CHECKS: tuple[tuple[str, Callable[..., Any]], ...] = (
    (SERVER_ERROR, not_a_server_error),
    ("status_code_conformance", status_code_conformance),
    ("content_type_conformance", content_type_conformance),
    ("response_schema_conformance", response_schema_conformance),
    ("response_headers_conformance", response_headers_conformance),
)
# Requests sent but not answered in time (or the connection broke): a hang is a bug too.
NO_RESPONSE = "no_response"
EXCERPT = 600
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)

# Values mixed into generated bodies: what people type, right and wrong, that random text
# seldom is.
CRONS = (
    "*/5 * * * *",
    "0 3 * * 1",
    "0 0 1 1 *",
    "61 * * * *",
    "* 25 * * *",
    "* * 0 * *",
    "* * * 13 *",
    "* * * * 8",
    "a b c d e",
    "*/0 * * * *",
    "1-0 * * * *",
    "5/ * * * *",
    ",,, * * * *",
    "* * * * mon-",
    "-1 * * * *",
    "0 3 * *",
    "0 3 * * 1 2",
    "9" * 30 + " * * * *",
)
CLOUD_CONFIGS = (
    "#cloud-config\nruncmd: [[ls, -l]]\n",
    "#cloud-config\npackages: [vim]\nwrite_files: [{path: /etc/motd, content: hi}]\n",
    "runcmd: [[true]]\n",
    "#cloud-config\n",
    "#include http://example.com/x\n",
    "#!/bin/sh\necho hi\n",
    "Content-Type: multipart/mixed\n",
    "#cloud-config\nruncmd: [\n",
    "#cloud-config\n- a\n- b\n",
    "#cloud-config\n\truncmd: []\n",
    "#cloud-config\n1: x\n",
    "#cloud-config\n? [a, b]\n: x\n",
    "#cloud-config\nruncmd: [2001-01-01, !!binary aGVsbG8=, .nan]\n",
    "#cloud-config\nusers: [{name: 1}]\n",
    "#cloud-config\nwrite_files: [{path: /x, source: {uri: 'http://example.com'}}]\n",
    "#cloud-config\nruncmd: &a [[ls, *a]]\n",
    "\ufeff#cloud-config\nruncmd: [[ls]]\n",
    "#cloud-config\n" + "a" * 70000,
    # What yaml.safe_load raises other errors than YAMLError for (500s once, now 422s).
    "#cloud-config\nruncmd: " + "[" * 20000 + "]" * 20000 + "\n",
    "#cloud-config\nruncmd: [" + "9" * 5000 + "]\n",
    "#cloud-config\nruncmd: [2001-13-45]\n",
)
BIG_BODY = 3 * 1024 * 1024  # over Django's DATA_UPLOAD_MAX_MEMORY_SIZE (2.5 MiB)
MANY_FIELDS = 1100  # over Django's DATA_UPLOAD_MAX_NUMBER_FIELDS (1000)
SNAPSHOT = "fuzz-snap"  # the seeded snapshot the {name} of snapshot operations names


# --- what the fuzzer runs against ---


@dataclass
class Seeded:
    """The rows the fuzzer starts from, the tokens, and the values it mixes into requests."""

    owner: User
    staff: User
    owner_token: str
    staff_token: str
    read_token: str  # the owner's read-only token
    guests: list[Guest] = field(default_factory=list)
    public_keys: list[str] = field(default_factory=list)

    def known(self) -> dict[str, list[Any]]:
        """Values that name real things, keyed by the collection they are ids of."""
        owner = self.owner
        return {
            "guests": [str(g.uuid) for g in Guest.objects.filter(owner=owner).order_by("pk")[:20]],
            "templates": list(GuestTemplate.objects.values_list("pk", flat=True)),
            "requests": list(
                ProvisioningRequest.objects.filter(owner=owner)
                .order_by("-pk")
                .values_list("pk", flat=True)[:20]
            ),
            "jobs": list(Job.objects.order_by("-pk").values_list("pk", flat=True)[:20]),
            "schedules": list(RebuildSchedule.objects.values_list("pk", flat=True)[:20]),
            "keys": list(SshKey.objects.filter(owner=owner).values_list("pk", flat=True)[:20]),
            "hosts": list(Host.objects.values_list("pk", flat=True)),
        }

    def refresh(self) -> None:
        """Put back what earlier operations used up: a schedule and a key to fuzz, and the
        guests free of the jobs they queued (no worker runs them: as if one had failed them)."""
        Job.objects.filter(status__in=Job.ACTIVE).update(
            status=Job.Status.FAILED, error="ended by the fuzzer"
        )
        if not SshKey.objects.filter(owner=self.owner).exists():
            factories.make_ssh_key(owner=self.owner)
        if not RebuildSchedule.objects.filter(guest__owner=self.owner).exists():
            schedules.schedule_create(guest=self.guests[2], by=self.owner, every_minutes=60)


def seed_rows(host: Host, template: GuestTemplate) -> Seeded:
    """An owner with a big quota and guests in every state, a key, schedules, a request and
    jobs of theirs, a cloud-image template (it takes keys and cloud-configs), a second host
    (somewhere to migrate to), a staff user with a guest; a token each."""
    owner = cast(User, factories.make_user("fuzz-owner", quota=factories.BIG_QUOTA))
    staff = cast(User, factories.make_user("fuzz-staff", staff=True))
    factories.make_host("spare", uri="test:///default")  # never connected to
    factories.make_template(
        name="Cloud (fuzz)",
        method=GuestTemplate.Method.CLOUD,
        host=host,
        base_volume="cloud.qcow2",
        cloud_user="fuzz",
        user_cloud_config=True,
    )
    guests = [
        factories.make_guest(
            owner=owner,
            template=template,
            host=host,
            name=f"fuzz-{state}",
            state=state,
            mac=f"52:54:00:00:00:{i:02x}",
        )
        for i, state in enumerate(Guest.State.values)
    ]
    guests.append(factories.make_guest(owner=owner, host=host, name="fuzz-no-template"))
    factories.make_guest(owner=staff, template=template, host=host, name="staff-guest")
    factories.make_ssh_key(owner=owner)
    Snapshot.objects.create(
        guest=guests[1], name=SNAPSHOT, taken=timezone.now(), state="shutoff", memory=False
    )
    schedules.schedule_create(guest=guests[2], by=owner, every_minutes=30)
    schedules.schedule_create(guest=guests[2], by=owner, cron="0 3 * * 1", enabled=False)
    provision.request_submit(
        owner=owner, template=template, overrides=provision.Overrides(name="fuzz-request")
    )
    job = Job.objects.create(
        kind=Job.Kind.START, status=Job.Status.SUCCEEDED, guest=guests[1], progress=100
    )
    JobEvent.objects.create(job=job, kind=JobEvent.Kind.STEP, message="started", progress=100)

    def token(user: User, scope: str) -> str:
        return tokens.token_create(user=user, name=f"fuzz {scope}", scope=scope, days=1).secret

    return Seeded(
        owner=owner,
        staff=staff,
        owner_token=token(owner, ApiToken.Scope.WRITE),
        staff_token=token(staff, ApiToken.Scope.WRITE),
        read_token=token(owner, ApiToken.Scope.READ),
        guests=guests,
        public_keys=[
            *(factories.new_public_key(comment=f"fuzz{i}@laptop") for i in range(5)),
            factories.new_public_key("ecdsa", bits=256),
            factories.new_public_key("ecdsa", bits=521, comment="x" * 200),
            factories.new_public_key("rsa", bits=1024, comment="weak"),
            factories.new_public_key("rsa", bits=2048),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA== short",
            "ssh-rsa AAAA",
            "ecdsa-sha2-nistp256 not-base64!",
        ],
    )


# --- what it found ---


@dataclass
class Found:
    """One failed check: where, what was sent, and what came back."""

    check: str
    operation: str
    mode: str
    method: str
    path: str
    body: str
    status: int | None
    response: str
    message: str

    def line(self) -> str:
        return (
            f"[{self.check}] {self.operation} ({self.mode}): {self.method} {self.path} "
            f"body={self.body!r} -> {self.status} {self.response!r}\n    {self.message}"
        )


@dataclass
class Report:
    requests: int = 0
    seconds: float = 0.0
    waited: float = 0.0  # of the seconds, those spent waiting for responses
    seed: int = 0
    by_check: Counter[str] = field(default_factory=Counter)
    by_operation: Counter[str] = field(default_factory=Counter)
    by_phase: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    # Generated requests the HTTP client refused to send, by why.
    unsendable: Counter[str] = field(default_factory=Counter)
    # (operation, mode) pairs schemathesis could make no case for, e.g. negative data for an
    # operation without parameters.
    ungenerated: list[str] = field(default_factory=list)
    failures: list[Found] = field(default_factory=list)

    @property
    def server_errors(self) -> int:
        return self.by_check[SERVER_ERROR]

    @property
    def schema_violations(self) -> int:
        return sum(self.by_check[name] for name in CONFORMANCE)

    @property
    def no_response(self) -> int:
        return self.by_check[NO_RESPONSE]

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "server_errors": self.server_errors,
            "schema_violations": self.schema_violations,
            "no_response": self.no_response,
            "seconds": round(self.seconds, 1),
            "waited_seconds": round(self.waited, 1),
            "seed": self.seed,
            "failures_by_check": dict(self.by_check),
            "requests_by_phase": dict(self.by_phase),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "requests_by_operation": dict(sorted(self.by_operation.items())),
            "unsendable": dict(self.unsendable),
            "ungenerated": sorted(set(self.ungenerated)),
            "failures": [f.__dict__ for f in self.failures[:200]],
        }

    def headline(self) -> str:
        return (
            f"fuzz: {self.requests} requests, {self.server_errors} server errors, "
            f"{self.schema_violations} schema violations, {self.no_response} without response "
            f"in {self.seconds:.0f} s (seed {self.seed})"
        )

    def describe(self, most: int = 30) -> str:
        """The headline and the first failures, one for each check, operation and status."""
        seen: set[tuple[str, str, int | None]] = set()
        lines = [self.headline()]
        for found in self.failures:
            key = (found.check, found.operation, found.status)
            if key in seen:
                continue
            seen.add(key)
            lines.append(found.line())
            if len(lines) > most:
                break
        return "\n".join(lines)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.summary(), indent=2, default=str) + "\n")


# --- the run ---


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value[: EXCERPT * 4].decode("utf-8", "replace")
    return str(value)[:EXCERPT]


def _collection(label: str) -> str:
    """The collection an operation's {id} or {uuid} is an id of."""
    parts = [p for p in label.split(" ", 1)[1].split("/") if p]
    for name in ("{uuid}", "{id}"):
        if name in parts:
            return parts[parts.index(name) - 1]
    return ""


def _known_for(label: str, seeded: Seeded) -> dict[str, list[Any]]:
    """The known values for this operation's path parameters and body fields."""
    known = seeded.known()
    out: dict[str, list[Any]] = {}
    collection = _collection(label)
    if collection:
        name = "uuid" if collection == "guests" else "id"
        out[f"path:{name}"] = known[collection]
    if "{name}" in label:
        out["path:name"] = [SNAPSHOT]
    if label == "POST /api/v1/requests":
        out["body:template"] = known["templates"]
        out["body:ssh_keys"] = [[k] for k in known["keys"]]
        out["body:cloud_config"] = list(CLOUD_CONFIGS)
    if label == "POST /api/v1/guests/{uuid}/migrate":
        out["body:dest"] = known["hosts"]
    if label == "POST /api/v1/keys":
        out["body:public_key"] = seeded.public_keys
    if label == "POST /api/v1/guests/{uuid}/schedules":
        out["body:cron"] = list(CRONS)
    return {k: v for k, v in out.items() if v}


def _with_known(strategy: st.SearchStrategy[Case], known: dict[str, list[Any]]) -> Any:
    """Cases of the strategy with, in about half of them, a known value in each place."""

    @st.composite
    def cases(draw: Any) -> Case:
        case: Case = draw(strategy)
        for where, values in known.items():
            if not draw(st.booleans()):
                continue
            kind, name = where.split(":", 1)
            value = draw(st.sampled_from(values))
            if kind == "path" and case.path_parameters and name in case.path_parameters:
                case.path_parameters[name] = value
            elif kind == "body" and isinstance(case.body, dict):
                case.body[name] = value
        return case

    return cases()


class Fuzzer:
    def __init__(
        self, base_url: str, seeded: Seeded, *, timeout: float = 10.0, seed: int | None = None
    ) -> None:
        self.base_url = base_url
        self.seeded = seeded
        self.timeout = timeout
        self.verbose = bool(os.environ.get("FUZZ_VERBOSE"))
        self.report = Report(seed=seed if seed is not None else random.getrandbits(32))
        self.session = requests.Session()
        # The token goes in every request: generated Authorization values would only replace
        # it (the probes send the odd ones).
        config = schemathesis.Config.from_dict({"generation": {"with-security-parameters": False}})
        self.schema = schemathesis.openapi.from_url(
            base_url + SCHEMA_PATH, config=config, timeout=timeout
        )
        self.operations = dict(self._operations())

    def _operations(self) -> Iterator[tuple[str, Any]]:
        for result in self.schema.get_all_operations():
            if isinstance(result, Err):
                raise result.err()
            operation = result.ok()
            label = f"{operation.method.upper()} {operation.path}"
            if label not in STREAMS:
                yield label, operation

    def _token(self, label: str) -> str:
        return self.seeded.staff_token if label in STAFF_ONLY else self.seeded.owner_token

    def _say(self, label: str, phase: str, before: int) -> None:
        if self.verbose:
            print(f"fuzz: {label} ({phase}): {self.report.requests - before}", flush=True)

    def run(self, *, examples: int, least: int = 0, coverage: bool = False) -> Report:
        """Coverage (if asked), the probes, then `examples` generated cases per operation and
        mode, in rounds until `least` requests in all were sent."""
        started = time.monotonic()
        if coverage:
            for label, operation in self.operations.items():
                self._cover(label, operation)
        self._probe()
        rounds = 0
        while rounds == 0 or self.report.requests < least:
            if rounds:  # a few cases more for each, until there are enough
                missing = least - self.report.requests
                examples = max(2, -(-missing // (len(self.operations) * len(MODES))) + 1)
            for label, operation in self.operations.items():
                for mode in MODES:
                    self._fuzz(label, operation, mode, examples, self.report.seed + rounds)
            rounds += 1
            if rounds > 50:  # the operations stopped giving new cases
                break
        self.report.seconds = time.monotonic() - started
        return self.report

    # --- the phases ---

    def _cover(self, label: str, operation: Any) -> None:
        self.seeded.refresh()
        known = {
            k.removeprefix("path:"): v
            for k, v in _known_for(label, self.seeded).items()
            if k.startswith("path:")
        }
        before = self.report.requests
        cases = self.schema.iter_coverage_cases(
            operation,
            generation_modes=list(MODES),
            generation_config=self.schema.config.generation_for(operation=operation),
        )
        for i, case in enumerate(cases):
            # Every other case names a real thing, so it gets past the 404.
            if i % 2 and case.path_parameters:
                for name, values in known.items():
                    if name in case.path_parameters:
                        case.path_parameters[name] = values[i // 2 % len(values)]
            mode = case.meta.generation.mode if case.meta is not None else MODES[0]
            self._send("coverage", label, mode.value, case, self._token(label))
        self._say(label, "coverage", before)

    def _fuzz(
        self, label: str, operation: Any, mode: GenerationMode, examples: int, seed: int
    ) -> None:
        self.seeded.refresh()
        strategy = _with_known(
            operation.as_strategy(generation_mode=mode), _known_for(label, self.seeded)
        )
        token = self._token(label)

        @hypothesis.seed(seed)
        @hypothesis.settings(
            max_examples=examples,
            deadline=None,
            database=None,
            phases=[hypothesis.Phase.generate],
            suppress_health_check=list(hypothesis.HealthCheck),
            verbosity=hypothesis.Verbosity.quiet,
        )
        @hypothesis.given(case=strategy)
        def one(case: Case) -> None:
            self._send("fuzzing", label, mode.value, case, token)

        before = self.report.requests
        try:
            one()
        except Unsatisfiable:
            if self.report.requests == before:
                self.report.ungenerated.append(f"{label} ({mode.value})")
        self._say(label, mode.value, before)

    def _probe(self) -> None:
        """Requests schemathesis does not make, each checked as its own are."""
        before = self.report.requests
        self.seeded.refresh()

        def params(label: str) -> dict[str, Any]:
            """A stopped guest of the owner's, a key or schedule of theirs as they are now."""
            collection = _collection(label)
            if not collection:
                return {}
            if collection == "guests":
                return {"uuid": str(self.seeded.guests[1].uuid), "kind": "start", "name": SNAPSHOT}
            return {"id": (self.seeded.known()[collection] or [1])[0]}

        def send(label: str, *, token: str | None = None, **kwargs: Any) -> Any:
            """token: another than the operation's; "" for none."""
            operation = self.operations[label]
            path = {k: v for k, v in params(label).items() if "{" + k + "}" in operation.path}
            case = operation.Case(path_parameters=path, query=kwargs.pop("query", None))
            token = self._token(label) if token is None else token
            response = self._send("probes", label, "probe", case, token, **kwargs)
            if self.verbose:
                print(f"fuzz: probe {label}: {getattr(response, 'status_code', None)}", flush=True)
            return response

        json_type = {"Content-Type": "application/json"}
        with_body = [label for label, op in self.operations.items() if op.body]
        big = b'{"name": "' + b"a" * BIG_BODY + b'"}'
        for label in with_body:
            send(label, data=big, headers=json_type)
            send(label, data=b"[" * 100_000 + b"]" * 100_000, headers=json_type)
            send(label, data=b'{"name": "\xff\xfe"}', headers=json_type)
            for text in ("null", "[]", "1", '"x"', "NaN", '{"a": 1, "a": 2}', "{" * 3):
                send(label, data=text.encode(), headers=json_type)
        many = {f"f{i}": "1" for i in range(MANY_FIELDS)}
        for label in self.operations:
            send(label, query=many, json={} if label in with_body else None)
        # If-Match, which the OpenAPI document does not name, on what honours it.
        matches = ("*", '"nope"', 'W/"x", "y"', ",", "a, ,b", '"' + "a" * 4000 + '"')
        for label, body in (
            ("PATCH /api/v1/keys/{id}", {"name": "renamed"}),
            ("PATCH /api/v1/schedules/{id}", {"enabled": True}),
            ("POST /api/v1/guests/{uuid}/actions/{kind}", None),
            ("DELETE /api/v1/guests/{uuid}", None),
        ):
            for value in matches:
                self.seeded.refresh()
                send(label, json=body, headers={"If-Match": value})
        # Credentials that are not a token of anyone's, or are a read-only one.
        auths = ("Bearer", "Basic eDp5", "bearer vmp_x", "Bearer  vmp_x", "Bearer vmp_" + "x" * 300)
        for label in ("GET /api/v1/quota", "POST /api/v1/keys"):
            for value in (*auths, "Bearer vmp_\xe9", "Token " + self.seeded.owner_token):
                send(label, json={"public_key": "x"}, headers={"Authorization": value})
        for label in ("POST /api/v1/keys", "DELETE /api/v1/keys/{id}"):
            send(label, json={"public_key": "x"}, token=self.seeded.read_token)
        self._probe_session(send)
        self._probe_idempotency(send, self.seeded.known()["templates"][0])
        self._probe_cursors(send)
        self._say("(hand-made requests)", "probes", before)

    def _probe_session(self, send: Callable[..., Any]) -> None:
        """The browser's session instead of a token: reads, and writes with and without the
        CSRF token."""
        client = Client()
        client.force_login(self.seeded.owner)
        session = client.cookies[settings.SESSION_COOKIE_NAME].value
        csrf = get_token(RequestFactory().get("/"))
        cookies = {settings.SESSION_COOKIE_NAME: session, settings.CSRF_COOKIE_NAME: csrf}
        for label in ("GET /api/v1/quota", "GET /api/v1/guests", "POST /api/v1/keys"):
            for header in ({}, {"X-CSRFToken": csrf}, {"X-CSRFToken": "x" * 64}):
                send(
                    label,
                    token="",
                    cookies=cookies,
                    json={"public_key": self.seeded.public_keys[0]},
                    headers=header,
                )
        send("GET /api/v1/quota", token="", cookies={settings.SESSION_COOKIE_NAME: "nope"})

    def _probe_idempotency(self, send: Callable[..., Any], template: int) -> None:
        label = "POST /api/v1/requests"
        key = f"fuzz-{self.report.seed}-{self.report.requests}"
        body = {"template": template, "name": f"idem-{self.report.requests}"}
        for sent in (body, body, {**body, "vcpus": 2}, {**body, "template": 2**53}):
            send(label, json=sent, headers={"Idempotency-Key": key})
        send(label, json={**body, "name": "idem-gone"}, headers={"Idempotency-Key": "x" * 256})

    def _probe_cursors(self, send: Callable[..., Any]) -> None:
        """Walk each list a page of one at a time, by the cursors it gives."""
        for label, operation in self.operations.items():
            if operation.get_parameter("limit", "query") is None:
                continue
            query: dict[str, Any] = {"limit": 1}
            for _ in range(4):
                response = send(label, query=query)
                if response is None or response.status_code != 200:
                    break
                after = json.loads(response.content).get("next")
                if not after:
                    break
                query = {"limit": 1, "cursor": after}

    # --- one request ---

    def _send(
        self, phase: str, label: str, mode: str, case: Case, token: str, **kwargs: Any
    ) -> Any:
        """Send the case (kwargs: what requests takes besides, e.g. data); check the answer."""
        report = self.report
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        headers.update(kwargs.pop("headers", {}))
        try:
            response = case.call(
                base_url=self.base_url,
                session=self.session,
                headers=headers,
                timeout=self.timeout,
                **kwargs,
            )
        except (requests.Timeout, requests.ConnectionError) as exc:
            report.requests += 1
            report.by_operation[label] += 1
            report.by_phase[phase] += 1
            self._found(NO_RESPONSE, label, mode, case, None, exc.request, type(exc).__name__)
            return None
        except (
            requests.exceptions.InvalidHeader,
            requests.exceptions.InvalidURL,
            ValueError,
        ) as exc:
            report.unsendable[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1
            return None
        report.requests += 1
        report.by_operation[label] += 1
        report.by_phase[phase] += 1
        report.statuses[response.status_code] += 1
        report.waited += response.elapsed
        # What the checks that send a request again (a control for a content-type probe) use.
        sent = {"base_url": self.base_url, "headers": headers, "session": self.session}
        for name, check in CHECKS:
            try:
                case.validate_response(
                    response, checks=[check], headers=headers, transport_kwargs=sent
                )
            except FailureGroup as group:
                for failure in group.exceptions:
                    self._found(name, label, mode, case, response, response.request, failure)
            except Failure as failure:
                self._found(name, label, mode, case, response, response.request, failure)
        return response

    def _found(
        self,
        check: str,
        label: str,
        mode: str,
        case: Case,
        response: Any,
        sent: Any,
        failure: Failure | str,
    ) -> None:
        self.report.by_check[check] += 1
        message = failure if isinstance(failure, str) else f"{failure.title}: {failure.message}"
        path = sent.url.removeprefix(self.base_url) if sent is not None else case.formatted_path
        self.report.failures.append(
            Found(
                check=check,
                operation=label,
                mode=mode,
                method=str(sent.method if sent is not None else case.method).upper(),
                path=_text(path),
                body=_text(sent.body if sent is not None else None),
                status=response.status_code if response is not None else None,
                response=_text(response.content if response is not None else None),
                message=_text(message),
            )
        )


def fuzz_live(
    stack: Stack,
    host: Host,
    template: GuestTemplate,
    *,
    examples: int,
    least: int = 0,
    coverage: bool = False,
    timeout: float = 10.0,
    seed: int | None = None,
) -> Report:
    """Seed, start the web server (no rate limit) and fuzz it: see `Fuzzer.run`.

    FUZZ_SEED in the environment repeats a run's generated cases (its report names its seed);
    FUZZ_VERBOSE prints the requests of each operation as it goes."""
    seeded = seed_rows(host, template)
    stack.env["VMPORTAL_API_RATE_PER_MINUTE"] = "0"
    stack.start("web")
    if seed is None and os.environ.get("FUZZ_SEED"):
        seed = int(os.environ["FUZZ_SEED"])
    fuzzer = Fuzzer(stack.base_url, seeded, timeout=timeout, seed=seed)
    return fuzzer.run(examples=examples, least=least, coverage=coverage)


def write_report(report: Report, name: str) -> Path:
    path = ARTIFACTS / name
    report.write(path)
    return path
