"""NoCloud seeds for cloud images: what cloud-init reads, checked, and the ISO that carries it.

cloud-init's NoCloud source looks for a filesystem labelled ``cidata`` holding ``meta-data``
(the instance-id and hostname), ``user-data`` (here always a ``#cloud-config`` document) and
optionally ``network-config``. It runs its once-per-instance modules again only when the
instance-id changes, so a rebuilt guest gets a new one.

Documents are built as data and written by a YAML emitter, never by formatting strings; what
admins and owners write is parsed, limited in size, checked against cloud-init's own JSON
schema and refused when it would make the guest fetch URLs that the template does not allow.
No Django here: callers pass the schema and the limits.
"""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import pycdlib
import yaml

SEED_LABEL = "cidata"
HEADER = "#cloud-config"
MAX_CLOUD_CONFIG_BYTES = 64 * 1024

# First lines that make user-data something other than one #cloud-config document.
_OTHER_KINDS = {
    "#include": "an #include list (cloud-init fetches each URL)",
    "#include-once": "an #include-once list (cloud-init fetches each URL)",
    "#!": "a script",
    "#cloud-boothook": "a boothook",
    "#part-handler": "a part handler",
    "#cloud-config-archive": "a cloud-config archive",
    "#cloud-config-jsonp": "a JSON patch",
    "content-type:": "a MIME multipart message",
}
# Top-level keys whose modules make the guest fetch or post to URLs of the config's choosing.
FETCHING_KEYS = ("phone_home", "ansible", "chef", "puppet", "salt_minion", "mcollective")


class CloudConfigError(ValueError):
    """A cloud-config that cannot be used; the message says why, for a form's field error."""


def load_schema(path: str | Path) -> dict[str, Any]:
    """cloud-init's JSON schema for cloud-config (schema-cloud-config-v1.json)."""
    return _load_schema(str(path))


@functools.lru_cache(maxsize=4)
def _load_schema(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            schema: dict[str, Any] = json.load(f)
    except FileNotFoundError:
        raise CloudConfigError(
            f"cloud-init's schema is not installed at {path} (make setup installs it)"
        ) from None
    return schema


def parse_cloud_config(
    text: str,
    *,
    schema: Mapping[str, Any],
    allow_fetch: bool = False,
    limit: int = MAX_CLOUD_CONFIG_BYTES,
) -> dict[str, Any]:
    """The cloud-config in `text` as a mapping ({} when blank), or CloudConfigError saying why not.

    The ``#cloud-config`` first line may be left out. Other user-data kinds (#include, scripts,
    MIME parts) are refused: only a cloud-config can be merged with the portal's values.
    """
    size = len(text.encode("utf-8"))
    if size > limit:
        raise CloudConfigError(f"It is {size} bytes; the limit is {limit} bytes.")
    if not text.strip():
        return {}
    first = text.lstrip().splitlines()[0].strip()
    if first.lower() != HEADER:
        for prefix, kind in _OTHER_KINDS.items():
            if first.lower().startswith(prefix):
                if prefix.startswith("#include") and not allow_fetch:
                    raise CloudConfigError(
                        f"This is {kind}; this template does not allow fetching URLs."
                    )
                raise CloudConfigError(f"This is {kind}; only a #cloud-config can be used here.")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise CloudConfigError(f"It is not valid YAML{where}: {problem}.") from None
    except RecursionError:
        raise CloudConfigError("It nests lists or mappings too deeply to read.") from None
    except ValueError as exc:
        # PyYAML's constructors: an integer past Python's digit limit, a date that is none.
        raise CloudConfigError(f"It has a value YAML cannot read: {exc}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CloudConfigError(f"It must be a mapping of keys to values, not a {_kind(data)}.")
    try:
        json.dumps(data, default=str)
    except (ValueError, RecursionError):
        # An alias inside its own anchor (`&a {x: *a}`): a value that contains itself.
        raise CloudConfigError(
            "It refers to itself (a YAML alias inside its own anchor)."
        ) from None
    problems = schema_problems(data, schema)
    if problems:
        raise CloudConfigError("It does not match cloud-init's schema: " + "; ".join(problems))
    if not allow_fetch:
        fetching = fetching_keys(data)
        if fetching:
            raise CloudConfigError(
                f"{', '.join(fetching)} make the guest fetch URLs; this template does not allow it."
            )
    return data


def schema_problems(data: Mapping[str, Any], schema: Mapping[str, Any], most: int = 5) -> list[str]:
    """What in `data` breaks cloud-init's schema, as `path: message` lines (at most `most`)."""
    validator_class = jsonschema.validators.validator_for(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    errors = sorted(validator.iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path])
    lines = []
    for error in errors[:most]:
        path = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        lines.append(f"{path}: {_short(error.message)}")
    if len(errors) > most:
        lines.append(f"and {len(errors) - most} more")
    return lines


def fetching_keys(data: Mapping[str, Any]) -> list[str]:
    """The parts of a cloud-config that make the guest fetch URLs."""
    found = [key for key in FETCHING_KEYS if key in data]
    files = data.get("write_files")
    if isinstance(files, list) and any(isinstance(f, dict) and "source" in f for f in files):
        found.append("write_files with a source")
    return found


def merged(*configs: Mapping[str, Any]) -> dict[str, Any]:
    """Configs merged left to right: mappings key by key, lists appended, other values replaced."""
    out: dict[str, Any] = {}
    for config in configs:
        for key, value in config.items():
            old = out.get(key)
            if isinstance(old, dict) and isinstance(value, Mapping):
                out[key] = merged(old, value)
            elif isinstance(old, list) and isinstance(value, list):
                out[key] = [*old, *value]
            else:
                out[key] = _copy(value)
    return out


def user_data(
    *,
    template: Mapping[str, Any],
    owner: Mapping[str, Any],
    hostname: str,
    user: str,
    keys: Sequence[str],
) -> dict[str, Any]:
    """The guest's cloud-config: the template's, the owner's snippet, then the portal's own values.

    The portal's values come last so they hold: the hostname is the guest's name, and the
    default user gets the owner's chosen keys (passwordless sudo, password login locked).
    """
    portal: dict[str, Any] = {
        "hostname": hostname,
        "preserve_hostname": False,
        "users": [
            {
                "name": user,
                "gecos": "vmportal default user",
                "shell": "/bin/bash",
                "sudo": "ALL=(ALL) NOPASSWD:ALL",
                "lock_passwd": True,
                "ssh_authorized_keys": list(keys),
            }
        ],
        "ssh_pwauth": False,
    }
    return merged(template, owner, portal)


def meta_data(*, instance_id: str, hostname: str) -> dict[str, str]:
    return {"instance-id": instance_id, "local-hostname": hostname}


def network_config(macs: Iterable[str]) -> dict[str, Any] | None:
    """Network config v2: DHCP on each NIC, matched by MAC; None for a guest without NICs."""
    ethernets = {
        f"nic{i}": {"match": {"macaddress": mac.lower()}, "dhcp4": True}
        for i, mac in enumerate(macs)
    }
    if not ethernets:
        return None
    return {"version": 2, "ethernets": ethernets}


def render(data: Mapping[str, Any], *, header: str | None = None) -> str:
    """A YAML document for cloud-init (with its first line, e.g. #cloud-config, when given)."""
    body = yaml.safe_dump(_copy(data), sort_keys=False, default_flow_style=False, width=1000)
    return f"{header}\n{body}" if header else body


def seed_files(
    *,
    meta_data: Mapping[str, Any],
    user_data: Mapping[str, Any],
    network_config: Mapping[str, Any] | None = None,
) -> dict[str, bytes]:
    """The seed's files by name, as cloud-init reads them."""
    files = {
        "meta-data": render(meta_data).encode(),
        "user-data": render(user_data, header=HEADER).encode(),
    }
    if network_config is not None:
        files["network-config"] = render(network_config).encode()
    return files


# ISO 9660 level-1 names for the seed's files; Rock Ridge and Joliet carry the real names.
_ISO_NAMES = {"meta-data": "META_DAT", "user-data": "USER_DAT", "network-config": "NETWORK"}


def seed_iso(
    *,
    meta_data: Mapping[str, Any],
    user_data: Mapping[str, Any],
    network_config: Mapping[str, Any] | None = None,
) -> bytes:
    """A NoCloud seed: an ISO 9660 image labelled cidata holding the seed's files."""
    files = seed_files(meta_data=meta_data, user_data=user_data, network_config=network_config)
    return iso_image(
        SEED_LABEL, {f"{_ISO_NAMES[name]}.": (name, data) for name, data in files.items()}
    )


def iso_image(label: str, files: Mapping[str, tuple[str, bytes]]) -> bytes:
    """An ISO 9660 image labelled `label` (Joliet and Rock Ridge names too) of files given as
    {ISO 9660 name ("NAME.EXT", or "NAME." with no extension): (long name, content)}."""
    iso = pycdlib.PyCdlib()
    iso.new(vol_ident=label, joliet=3, rock_ridge="1.09")
    try:
        for short, (name, content) in files.items():
            iso.add_fp(
                io.BytesIO(content),
                len(content),
                iso_path=f"/{short};1",
                rr_name=name,
                joliet_path=f"/{name}",
            )
        out = io.BytesIO()
        iso.write_fp(out)
    finally:
        iso.close()
    return out.getvalue()


def read_seed_iso(data: bytes) -> dict[str, bytes]:
    """The files of a seed ISO by their Rock Ridge names, and its label under ``""``."""
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    try:
        files: dict[str, bytes] = {"": iso.pvd.volume_identifier.rstrip(b" ")}
        for child in iso.list_children(rr_path="/"):
            if child.is_dot() or child.is_dotdot():
                continue
            name = child.rock_ridge.name().decode()
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
            files[name] = out.getvalue()
    finally:
        iso.close()
    return files


def _copy(value: Any) -> Any:
    """Plain dicts and lists all the way down (the YAML emitter writes no tags for them)."""
    if isinstance(value, Mapping):
        return {str(k): _copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_copy(v) for v in value]
    return value


def _kind(value: object) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(
        type(value), type(value).__name__
    )


def _short(message: str, most: int = 200) -> str:
    return message if len(message) <= most else message[: most - 1] + "…"
