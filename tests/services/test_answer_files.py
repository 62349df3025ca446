"""Answer files per request: rendered at submit, served once at /install/<token>/ while the
installer runs, gone with the request (test driver rows; the real install is on QEMU in
tests/services/provision/test_answer_qemu.py)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from provisioning.models import AnswerFile, Guest, GuestTemplate, Job, JobEvent, ProvisioningRequest
from provisioning.services import transitions
from provisioning.services.answer_files import AnswerGone, answer_fetch
from provisioning.services.provision import Overrides, SubmitError, request_submit
from tests.factories import make_host, make_template, make_user

pytestmark = pytest.mark.django_db
ANSWER = "hostname={{ name }}\n{% for k in ssh_keys %}key={{ k }}\n{% endfor %}"
Status = ProvisioningRequest.Status


@pytest.fixture
def template(settings) -> GuestTemplate:
    settings.ANSWER_BASE_URL = "http://192.0.2.1:8000"
    made = make_template(host=make_host())
    made.answer_file = ANSWER
    made.kernel_cmdline = "console=ttyS0 vmportal.install=1 vmportal.answer_url={answer_url}"
    made.save()
    return made


def ask(template: GuestTemplate, name: str = "ans1") -> ProvisioningRequest:
    owner = make_user(f"owner-{name}")
    overrides = Overrides(name=name, ssh_keys=["ssh-ed25519 AAAAkey ann@laptop"])
    return request_submit(owner=owner, template=template, overrides=overrides)


def installing(request: ProvisioningRequest) -> None:
    ProvisioningRequest.objects.filter(pk=request.pk).update(status=Status.WAITING)


def test_submit_renders_the_file_once_behind_a_token_and_the_cmdline_names_it(
    template: GuestTemplate,
) -> None:
    request = ask(template)
    answer = AnswerFile.objects.get(request=request)
    assert answer.content == "hostname=ans1\nkey=ssh-ed25519 AAAAkey ann@laptop\n"
    assert len(answer.token) >= 43 and answer.expires > timezone.now()
    from provisioning.services.provision.spec import load_request, plan_of

    plan = plan_of(load_request(request.pk))
    assert plan.cmdline().endswith(
        f"vmportal.answer_url=http://192.0.2.1:8000/install/{answer.token}/"
    )


def test_the_installer_gets_it_once_and_the_job_log_says_so(template: GuestTemplate) -> None:
    request = ask(template)
    installing(request)
    token = request.answer.token
    assert answer_fetch(token=token, client="10.0.0.9").startswith("hostname=ans1")
    job = Job.objects.get(request=request)
    lines = list(job.events.filter(kind=JobEvent.Kind.LOG).values_list("message", flat=True))
    assert "The installer fetched its answer file (from 10.0.0.9)" in lines
    with pytest.raises(AnswerGone) as again:
        answer_fetch(token=token, client="10.0.0.9")
    assert again.value.status == 410 and "fetched already" in again.value.reason


def test_over_http_unknown_is_404_and_used_expired_or_finished_is_410(
    template: GuestTemplate,
) -> None:
    client = Client()
    assert client.get("/install/nosuchtoken/").status_code == 404
    first = ask(template, "ans2")
    installing(first)
    # HEAD would spend the one fetch without handing the file over: refused, the token kept.
    assert client.head(f"/install/{first.answer.token}/").status_code == 405
    served = client.get(f"/install/{first.answer.token}/")
    assert served.status_code == 200 and served["Content-Type"].startswith("text/plain")
    assert served.content.decode().startswith("hostname=ans2")
    assert client.get(f"/install/{first.answer.token}/").status_code == 410
    expired = ask(template, "ans3")
    installing(expired)
    AnswerFile.objects.filter(request=expired).update(expires=timezone.now() - timedelta(seconds=1))
    assert client.get(f"/install/{expired.answer.token}/").status_code == 410
    # The token dies with the request: cancelled (or failed, or running) means no file.
    cancelled = ask(template, "ans4")
    transitions.request_move(cancelled.pk, expected=Status.PENDING, to=Status.CANCELLED)
    gone = client.get(f"/install/{cancelled.answer.token}/")
    assert gone.status_code == 410 and b"not running" in gone.content
    assert client.post(f"/install/{first.answer.token}/").status_code == 405


def test_no_address_for_guests_refuses_the_request_and_leaves_nothing(
    template: GuestTemplate, settings
) -> None:
    settings.ANSWER_BASE_URL = ""
    with pytest.raises(SubmitError) as refused:
        ask(template)
    assert "address as guests reach it is not set" in refused.value.errors["template"]
    assert not Guest.objects.exists() and not ProvisioningRequest.objects.exists()


def test_a_file_that_renders_over_one_mib_refuses_the_request(template: GuestTemplate) -> None:
    template.answer_file = "{% for k in ssh_keys %}" + "y" * (1024 * 1024 + 1) + "{% endfor %}"
    template.save()
    with pytest.raises(SubmitError) as refused:
        ask(template)
    assert "at most 1048576" in refused.value.errors["template"]
    assert not AnswerFile.objects.exists() and not Guest.objects.exists()


def test_an_oemdrv_template_needs_no_address_for_guests(template: GuestTemplate, settings) -> None:
    settings.ANSWER_BASE_URL = ""
    template.answer_delivery = GuestTemplate.AnswerDelivery.OEMDRV
    template.kernel_cmdline = "console=ttyS0 vmportal.install=1 vmportal.answer=oemdrv"
    template.save()
    request = ask(template, "ans5")
    assert request.answer.content.startswith("hostname=ans5")
    from provisioning.services.provision.spec import load_request, plan_of

    plan = plan_of(load_request(request.pk))
    assert plan.answer_volume == f"ans5-{request.guest.uuid.hex[:8]}-oemdrv.iso"
    assert plan.answer_volume in plan.volumes
