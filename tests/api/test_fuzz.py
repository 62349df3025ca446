"""Contract fuzzing of the REST API (schemathesis) against the live web server.

The short pass runs in the normal suite; the long one (10,000+ requests) only with
FUZZ_REQUESTS set, as `make fuzz` runs it."""

from __future__ import annotations

import json
import os

import pytest
from django.test import Client

from provisioning.models import ApiToken, GuestTemplate
from provisioning.services import tokens
from tests import factories
from tests.support import fuzz

SHORT_REQUESTS = 300
LONG_REQUESTS = int(os.environ.get("FUZZ_REQUESTS", "0") or 0)


def _assert_clean(report: fuzz.Report, least: int) -> None:
    assert report.requests >= least, report.headline()
    assert report.server_errors == 0, report.describe()
    assert report.schema_violations == 0, report.describe()
    assert report.no_response == 0, report.describe()


@pytest.mark.timeout(240)
def test_short_fuzz_pass(stack, test_host, kernel_template) -> None:
    report = fuzz.fuzz_live(
        stack, test_host, kernel_template, examples=6, least=SHORT_REQUESTS, timeout=10
    )
    fuzz.write_report(report, "fuzz-short.json")
    print(report.headline())
    _assert_clean(report, SHORT_REQUESTS)


# The long pass exists only when `make fuzz` asks for it (FUZZ_REQUESTS=10000): the suite has
# the short one, and nothing in it is skipped.
if LONG_REQUESTS:

    @pytest.mark.timeout(3 * 3600)
    def test_long_fuzz_pass(stack, test_host, kernel_template) -> None:
        report = fuzz.fuzz_live(
            stack,
            test_host,
            kernel_template,
            examples=max(1, LONG_REQUESTS // 60),
            least=LONG_REQUESTS,
            coverage=True,
            timeout=30,
        )
        path = fuzz.write_report(report, "fuzz.json")
        print(f"\n{report.headline()}\n(written to {path})")
        _assert_clean(report, LONG_REQUESTS)


# Found by hand while building the fuzzer's cloud-config dictionary: yaml.safe_load also
# raises RecursionError for deep nesting and ValueError for integers over Python's 4300-digit
# limit or impossible dates, and the API answered 500; each is now a 422 naming cloud_config.
YAML_THAT_CRASHES = {
    "deep lists": "#cloud-config\nruncmd: " + "[" * 20000 + "]" * 20000 + "\n",
    "deep mappings": "#cloud-config\nruncmd: " + "{a: " * 10000 + "1" + "}" * 10000 + "\n",
    "a 5000-digit integer": "#cloud-config\nruncmd: [" + "9" * 5000 + "]\n",
    "month 13": "#cloud-config\nruncmd: [2001-13-45]\n",
}


@pytest.mark.parametrize("text", YAML_THAT_CRASHES.values(), ids=YAML_THAT_CRASHES.keys())
def test_a_cloud_config_yaml_cannot_read_is_refused_as_invalid(db: None, text: str) -> None:
    owner = factories.make_user("yaml-owner", quota=factories.BIG_QUOTA)
    host = factories.make_host("local")
    template = factories.make_template(
        name="Cloud",
        method=GuestTemplate.Method.CLOUD,
        host=host,
        base_volume="cloud.qcow2",
        cloud_user="debian",
        user_cloud_config=True,
    )
    secret = tokens.token_create(user=owner, name="t", scope=ApiToken.Scope.WRITE, days=1).secret
    response = Client(raise_request_exception=False).post(
        "/api/v1/requests",
        data=json.dumps({"template": template.pk, "name": "yaml", "cloud_config": text}),
        content_type="application/json",
        headers={"Authorization": f"Bearer {secret}"},
    )
    assert response.status_code == 422, response.content[:300]
    assert response["Content-Type"] == "application/problem+json"
    assert [e["field"] for e in response.json()["errors"]] == ["cloud_config"]
