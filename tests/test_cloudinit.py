"""cloud-init seeds: what owners and admins write is parsed, limited and checked."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from django.conf import settings

from provisioning import cloudinit
from provisioning.cloudinit import CloudConfigError


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return cloudinit.load_schema(settings.CLOUD_CONFIG_SCHEMA)


def parse(text: str, schema: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return cloudinit.parse_cloud_config(text, schema=schema, **kw)


def test_it_reads_a_cloud_config_with_or_without_its_first_line(schema) -> None:
    text = "packages: [htop]\nruncmd:\n  - [touch, /tmp/x]\n"
    assert parse("#cloud-config\n" + text, schema) == parse(text, schema)
    assert parse(text, schema) == {"packages": ["htop"], "runcmd": [["touch", "/tmp/x"]]}
    assert parse("  \n", schema) == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("packages: [", "not valid YAML (line 1, column"),
        ("- a\n- b\n", "must be a mapping of keys to values, not a list"),
        ("packages: 3\n", "packages: 3 is not of type 'array'"),
        ("users: [{name: 1}]\n", "users.0:"),
        ("#!/bin/sh\necho hi\n", "This is a script; only a #cloud-config can be used here"),
        ("Content-Type: multipart/mixed\n", "a MIME multipart message"),
        ("#include\nhttp://example.invalid/a\n", "does not allow fetching URLs"),
        ("phone_home: {url: 'http://example.invalid/'}\n", "phone_home make the guest fetch"),
        ("runcmd: &a [*a]\n", "refers to itself"),
        ("runcmd: " + "[" * 20000 + "]" * 20000 + "\n", "nests lists or mappings too deeply"),
        ("runcmd: [2001-13-45]\n", "a value YAML cannot read"),
    ],
)
def test_it_refuses_what_cloud_init_could_not_use_or_the_template_forbids(
    schema, text: str, message: str
) -> None:
    with pytest.raises(CloudConfigError) as caught:
        parse(text, schema)
    assert message in str(caught.value)


def test_files_fetched_from_a_url_count_as_fetching() -> None:
    # cloud-init 23.1 added write_files' source; the schema Debian 12 ships refuses it anyway.
    assert cloudinit.fetching_keys({"write_files": [{"path": "/a", "source": {"uri": "x"}}]}) == [
        "write_files with a source"
    ]
    assert cloudinit.fetching_keys({"write_files": [{"path": "/a", "content": "x"}]}) == []


def test_a_template_that_allows_fetching_may_have_fetching_modules_but_no_include(schema) -> None:
    assert parse("phone_home: {url: 'http://example.invalid/'}\n", schema, allow_fetch=True)
    with pytest.raises(CloudConfigError, match="only a #cloud-config can be used here"):
        parse("#include\nhttp://example.invalid/a\n", schema, allow_fetch=True)


def test_it_refuses_a_cloud_config_over_the_limit(schema) -> None:
    big = "#cloud-config\nbootcmd:\n" + "".join(f"  - echo {i:060d}\n" for i in range(1200))
    assert len(big.encode()) > cloudinit.MAX_CLOUD_CONFIG_BYTES
    with pytest.raises(CloudConfigError, match=r"bytes; the limit is 65536 bytes"):
        parse(big, schema)


def test_the_portals_values_come_last_and_lists_add_up() -> None:
    data = cloudinit.user_data(
        template={"packages": ["a"], "hostname": "from-template", "timezone": "UTC"},
        owner={"packages": ["b"], "hostname": "from-owner", "timezone": "Europe/Paris"},
        hostname="web1",
        user="debian",
        keys=["ssh-ed25519 AAAAC3 kim@laptop"],
    )
    assert data["packages"] == ["a", "b"]
    assert data["timezone"] == "Europe/Paris"
    assert data["hostname"] == "web1"
    (user,) = data["users"]
    assert user["name"] == "debian" and user["ssh_authorized_keys"] == [
        "ssh-ed25519 AAAAC3 kim@laptop"
    ]
    assert user["lock_passwd"] is True and data["ssh_pwauth"] is False


def test_the_seed_is_an_iso_labelled_cidata_with_the_three_documents(schema) -> None:
    meta = cloudinit.meta_data(instance_id="1234-abcd", hostname="web1")
    user = cloudinit.user_data(
        template={},
        owner={"runcmd": ["echo 'quoted: yes' # not a comment"]},
        hostname="web1",
        user="debian",
        keys=["ssh-ed25519 AAAAC3 kim"],
    )
    network = cloudinit.network_config(["52:54:00:AB:cd:01"])
    files = cloudinit.read_seed_iso(
        cloudinit.seed_iso(meta_data=meta, user_data=user, network_config=network)
    )
    assert files[""] == b"cidata"
    assert set(files) == {"", "meta-data", "user-data", "network-config"}
    assert yaml.safe_load(files["meta-data"]) == {
        "instance-id": "1234-abcd",
        "local-hostname": "web1",
    }
    assert files["user-data"].startswith(b"#cloud-config\n")
    assert yaml.safe_load(files["user-data"]) == user  # the emitter quoted what needed quoting
    assert parse(files["user-data"].decode(), schema) == user
    assert yaml.safe_load(files["network-config"]) == {
        "version": 2,
        "ethernets": {"nic0": {"match": {"macaddress": "52:54:00:ab:cd:01"}, "dhcp4": True}},
    }


def test_a_guest_without_nics_gets_no_network_config() -> None:
    assert cloudinit.network_config([]) is None
    files = cloudinit.seed_files(meta_data={"instance-id": "x"}, user_data={})
    assert set(files) == {"meta-data", "user-data"}


def test_a_missing_schema_says_how_to_get_it(tmp_path) -> None:
    with pytest.raises(CloudConfigError, match="make setup installs it"):
        cloudinit.load_schema(tmp_path / "nope.json")
