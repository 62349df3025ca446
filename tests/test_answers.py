"""Answer-file templates: the allowed language, the fixed context, the limits (no libvirt)."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError

from provisioning import answers
from provisioning.models import GuestTemplate
from tests.factories import make_host, make_template

KS = """# kickstart for {{ name }}
network --hostname={{ name }} --device={{ mac }}
rootpw --iscrypted {{ password_hash }}
{% for key in ssh_keys %}sshkey --username=root "{{ key }}"
{% endfor %}# {{ vcpus }} vCPU, {{ memory_mib }} MiB, {{ disk_mib }} MiB disk, {{ uuid }}
"""


def test_it_renders_the_fixed_context_as_plain_text() -> None:
    context = answers.context_for(
        name="web1",
        uuid="0e0e0e0e-0000-4000-8000-000000000001",
        mac="52:54:00:aa:bb:cc",
        ssh_keys=["ssh-ed25519 AAAA one@x", "ssh-ed25519 BBBB two@y"],
        vcpus=2,
        memory_mib=1024,
        disk_mib=4096,
        password_hash=answers.password_hash("secret"),
    )
    text = answers.render(KS, context)
    assert "network --hostname=web1 --device=52:54:00:aa:bb:cc" in text
    assert 'sshkey --username=root "ssh-ed25519 AAAA one@x"' in text
    assert 'sshkey --username=root "ssh-ed25519 BBBB two@y"' in text
    assert "2 vCPU, 1024 MiB, 4096 MiB disk, 0e0e0e0e-0000-4000-8000-000000000001" in text
    assert "&quot;" not in text and "&lt;" not in text, "nothing HTML-escaped"


def test_the_password_hash_is_sha512_crypt_and_differs_every_time() -> None:
    first, second = answers.password_hash("pw"), answers.password_hash("pw")
    assert first.startswith("$6$") and second.startswith("$6$") and first != second


@pytest.mark.parametrize(
    ("source", "says"),
    [
        ("{% include 'x.html' %}", "tag {% include %} is not allowed"),
        ("{% load static %}", "tag {% load %} is not allowed"),
        ("{% debug %}", "tag {% debug %} is not allowed"),
        ("{% url 'admin:index' %}", "tag {% url %} is not allowed"),
        ("{% extends 'base.html' %}", "tag {% extends %} is not allowed"),
        ("{% csrf_token %}", "tag {% csrf_token %} is not allowed"),
        ("{% if name %}unclosed", "does not parse"),
        ("{{ name|nosuchfilter }}", "does not parse"),
    ],
)
def test_it_refuses_tags_outside_the_allowed_set_and_templates_that_do_not_parse(
    source: str, says: str
) -> None:
    with pytest.raises(answers.AnswerFileError, match=".*".join(map(_re, says.split("*")))):
        answers.check(source)


def _re(text: str) -> str:
    import re

    return re.escape(text)


def test_the_context_holds_no_objects_to_reach_settings_through() -> None:
    text = answers.render(
        "{{ settings }}{{ request }}{{ view }}{{ ssh_keys.0.upper }}",
        answers.sample_context(),
    )
    assert (
        text == "SSH-ED25519 AAAAC3NZAC1LZDI1NTE5AAAAIEXAMPLEKEYONLYFORTHEPREVIEW0000000 YOU@LAPTOP"
    )


def test_a_rendered_file_over_one_mib_is_refused() -> None:
    big = "{% for k in ssh_keys %}" + "x" * (1024 * 1024) + "{% endfor %}!"
    with pytest.raises(answers.AnswerFileError, match="at most 1048576"):
        answers.render(big, answers.sample_context())


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("fields", "field", "says"),
    [
        ({"answer_file": "{% include 'x' %}"}, "answer_file", "is not allowed"),
        ({"answer_file": "{% if %}"}, "answer_file", "does not parse"),
        (
            {"kernel_cmdline": "console=ttyS0 inst.ks={answer_url}"},
            "kernel_cmdline",
            "no answer file",
        ),
        ({"answer_file": "x", "kernel_cmdline": "console=ttyS0"}, "kernel_cmdline", "put {"),
        (
            {"answer_file": "x", "kernel_cmdline": "a" * 2040 + " ks={answer_url}"},
            "kernel_cmdline",
            "at most 2047",
        ),
        (
            {"answer_file": "x", "kernel_cmdline": "ks={answer_url}", "lifecycle": "persistent"},
            "answer_file",
            "lifecycle must install",
        ),
    ],
)
def test_the_template_says_what_is_wrong_with_its_answer_file_or_cmdline(
    fields: dict[str, str], field: str, says: str
) -> None:
    host = make_host()
    template = make_template(host=host)
    for name, value in fields.items():
        setattr(template, name, value)
    with pytest.raises(ValidationError) as problems:
        template.full_clean()
    assert says in " ".join(problems.value.message_dict.get(field, [])), problems.value


@pytest.mark.django_db
def test_a_template_with_an_answer_file_and_its_placeholder_is_fine() -> None:
    template = make_template(host=make_host())
    template.answer_file = KS
    template.kernel_cmdline = "console=ttyS0 vmportal.install=1 inst.ks={answer_url}"
    template.full_clean()
    assert template.lifecycle == GuestTemplate.Lifecycle.INSTALL


def test_the_oemdrv_image_is_labelled_oemdrv_and_holds_ks_cfg() -> None:
    from provisioning import cloudinit

    files = cloudinit.read_seed_iso(answers.oemdrv_iso("text=1\n"))
    assert files[""] == b"OEMDRV" and files["ks.cfg"] == b"text=1\n"


@pytest.mark.django_db
def test_an_oemdrv_template_takes_no_placeholder_and_needs_none() -> None:
    template = make_template(host=make_host())
    template.answer_file = "x"
    template.answer_delivery = GuestTemplate.AnswerDelivery.OEMDRV
    template.kernel_cmdline = "console=ttyS0 vmportal.install=1"
    template.full_clean()
    template.kernel_cmdline = "console=ttyS0 inst.ks={answer_url}"
    with pytest.raises(ValidationError) as problems:
        template.full_clean()
    assert "OEMDRV CD-ROM: take {answer_url} out" in str(problems.value)


def test_the_oemdrv_cd_rom_is_in_the_install_phase_only() -> None:
    from provisioning.hypervisor import domxml

    spec = domxml.GuestSpec(
        name="g1",
        uuid="00000000-0000-4000-8000-00000000000a",
        memory_mib=256,
        vcpus=1,
        method="kernel",
        domain_type="qemu",
        disks=(domxml.DiskSpec(domxml.VolumeRef("p", "g1.qcow2")),),
        media=domxml.BootMedia(kernel="/boot/k", initrd="/boot/i", cmdline="console=ttyS0"),
        answer_disk=domxml.VolumeRef("p", "g1-oemdrv.iso"),
    )
    assert "g1-oemdrv.iso" in domxml.install_xml(spec)
    assert "g1-oemdrv.iso" not in domxml.final_xml(spec)
