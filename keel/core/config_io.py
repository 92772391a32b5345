"""Configuration as files for review in git: `keel config export DIR` / `keel config import DIR`.

A running Keel's API-defined deployments (secrets by credential *name* only: the API never returns a value),
its active policy, workflows and agent mandates become one YAML file each under DIR, with `keel-config.json`
naming the format and each definition's team. Import reads every file, validates all of them (each
capability's own parser, given by the caller, then the server's policy check) before changing anything,
applies them through the same admin API a person would use (so audit events and propagation happen as
usual), and if the server still refuses one, puts back what this import had already changed.

    >>> export_config(Client.from_env(), Path("config"))                     # doctest: +SKIP
    >>> import_config(Client.from_env(), Path("config"), validators)         # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from keel.core.client import Client, RemoteError
from keel.core.errors import BadRequest, Conflict, KeelError, ValidationFailed

FORMAT = "keel-config"
INDEX = "keel-config.json"
SECTIONS = ("deployments", "workflows", "agents")
POLICY_FILE = "policy.yaml"
SECRET_FIELDS = ("api_key",)  # never written, whatever a future listing returns
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SECRET_PARAM = re.compile(r"key|token|secret|passw|sig|auth|credential", re.IGNORECASE)

Validator = Callable[[str, str], None]  # (text, file name) → None, or raises a KeelError naming the field


class ConfigImportError(KeelError):
    """The server refused a definition mid-import; what this import had changed was put back."""

    code, status, title = "config_import_failed", 400, "Config import failed"


def _file_name(name: str) -> str:
    return _SAFE.sub("_", name).strip("_")[:150] + ".yaml"


def _q(name: str) -> str:
    return urllib.parse.quote(name, safe="")


@dataclass
class Bundle:
    """Every definition in one export: deployments as dicts, the others as their YAML source."""

    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)
    workflows: dict[str, str] = field(default_factory=dict)
    agents: dict[str, str] = field(default_factory=dict)
    policy: str | None = None
    teams: dict[str, dict[str, str | None]] = field(default_factory=dict)  # "workflows/name" → team id


def read_server(client: Client) -> Bundle:
    """What the server behind `client` (an admin key) holds now."""
    b = Bundle()
    for d in client.get("/admin/deployments")["data"]:
        if d.get("source") == "api":
            _refuse_secret_url(d)
            b.deployments[d["id"]] = {k: v for k, v in d.items() if k not in ("source", *SECRET_FIELDS)}
    for section in ("workflows", "agents"):
        for item in client.get(f"/v1/{section}")["data"]:
            full = client.get(f"/v1/{section}/{_q(item['name'])}")
            getattr(b, section)[item["name"]] = full["source"]
            b.teams[f"{section}/{item['name']}"] = full.get("team_id")
    try:
        b.policy = client.get("/admin/policy")["content"]
    except RemoteError as exc:
        if exc.status != 404:
            raise
    return b


def _refuse_secret_url(d: dict[str, Any]) -> None:
    """A base_url carrying a secret (a password in it, or a key/token/signature in its query) is not exported:
    the files are meant for git. The message names the deployment, never the value."""
    parts = urllib.parse.urlsplit(str(d.get("base_url") or ""))
    named = [k for k, _ in urllib.parse.parse_qsl(parts.query) if _SECRET_PARAM.search(k)]
    if parts.password or named:
        where = "a password" if parts.password else f"the query parameter {named[0]!r}"
        raise BadRequest(f"deployment {d.get('id')!r}: its base_url carries {where}; nothing exported",
                         fix="keep the secret in the vault (the deployment's `api_key`/`credential`) and give a "
                             "base_url without it, then export again")


def write_files(b: Bundle, dest: Path) -> list[Path]:
    """Write `b` under `dest` (a new or empty folder); returns the files written."""
    if dest.exists() and any(dest.iterdir()):
        raise Conflict(f"{dest} is not empty", fix="export into a new folder (or empty it first)")
    written: list[Path] = []
    index: dict[str, Any] = {"format": FORMAT, "version": 1, "exported_at": time.time(), "files": {}}
    for section in SECTIONS:
        items = getattr(b, section)
        if not items:
            continue
        (dest / section).mkdir(parents=True, exist_ok=True)
        for name, item in sorted(items.items()):
            path = dest / section / _file_name(name)
            text = yaml.safe_dump(item, sort_keys=True, allow_unicode=True) if section == "deployments" else item
            path.write_text(text, encoding="utf-8")
            index["files"][f"{section}/{path.name}"] = {"name": name, "team_id": b.teams.get(f"{section}/{name}")}
            written.append(path)
    if b.policy is not None:
        (dest / POLICY_FILE).write_text(b.policy, encoding="utf-8")
        index["files"][POLICY_FILE] = {"name": "policy"}
        written.append(dest / POLICY_FILE)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return [*written, dest / INDEX]


def export_config(client: Client, dest: Path) -> list[Path]:
    return write_files(read_server(client), dest)


def read_files(src: Path, validators: dict[str, Validator]) -> Bundle:
    """Read and validate every file under `src`; raises one ValidationFailed listing every problem found.
    A symlink inside `src` is refused, never followed: the folder may come from an untrusted branch."""
    if _symlinked(src, INDEX):
        raise BadRequest(f"{src}/{INDEX} is a symlink; nothing imported",
                         fix="import a folder whose files and folders are real ones (copy, don't link)")
    try:
        index = json.loads((src / INDEX).read_text(encoding="utf-8"))
        if index.get("format") != FORMAT or not isinstance(index.get("files"), dict):
            raise ValueError
    except (OSError, ValueError):
        raise BadRequest(f"{src} is not a Keel config export (no valid {INDEX})",
                         fix="name a folder that `keel config export` wrote") from None
    b = Bundle()
    problems: list[str] = []
    for rel, meta in sorted(index["files"].items()):
        path = src / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute() or not isinstance(meta, dict):
            problems.append(f"{rel}: not a file of this export")
            continue
        if _symlinked(src, rel):
            problems.append(f"{rel}: a symlink (or under one); Keel does not follow links out of the folder")
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            problems.append(f"{rel}: {exc.strerror or exc}")
            continue
        section = rel.split("/", 1)[0] if "/" in rel else ("policy" if rel == POLICY_FILE else "")
        check = validators.get(section)
        if check is None:
            problems.append(f"{rel}: not a section Keel imports ({', '.join((*SECTIONS, POLICY_FILE))})")
            continue
        try:
            check(text, rel)
        except KeelError as exc:
            problems.append(f"{rel}: {exc.detail}")
            continue
        name = str(meta.get("name") or "")
        if section == "deployments":
            data = yaml.safe_load(text)
            b.deployments[str(data.get("id") or name)] = data
        elif section == "policy":
            b.policy = text
        else:
            getattr(b, section)[name] = text
            b.teams[f"{section}/{name}"] = meta.get("team_id")
    if problems:
        raise ValidationFailed(f"{len(problems)} file(s) invalid, nothing imported: " + "; ".join(problems),
                               fix="correct the named files and import again")
    return b


def _symlinked(src: Path, rel: str) -> bool:
    """Whether `src/rel` or any folder between `src` and it is a symbolic link."""
    path = src
    for part in Path(rel).parts:
        path = path / part
        if path.is_symlink():
            return True
    return False


def _define(client: Client, section: str, name: str, source: str, team: str | None) -> None:
    body: dict[str, Any] = {"spec": source}
    if team:
        body["team"] = team
    client.post(f"/v1/{section}", body)


def _put_deployment(client: Client, did: str, data: dict[str, Any], exists: bool) -> None:
    if exists:
        client.request("PUT", f"/admin/deployments/{did}", {k: v for k, v in data.items() if k != "id"})
    else:
        client.post("/admin/deployments", {**data, "id": did})


def _set_policy(client: Client, text: str) -> None:
    client.request("PUT", "/admin/policy", raw=text.encode("utf-8"), content_type="application/yaml")


def import_config(client: Client, src: Path, validators: dict[str, Validator]) -> dict[str, int]:
    """Apply the export in `src` to the server; returns how many definitions changed per section.
    Every file is validated before the first change; a refusal by the server undoes this import's changes."""
    want = read_files(src, validators)
    if want.policy is not None:
        try:
            client.request("POST", "/admin/policy/check", raw=want.policy.encode(), content_type="application/yaml")
        except RemoteError as exc:
            raise ValidationFailed(f"{POLICY_FILE}: {exc.detail}; nothing imported",
                                   fix=exc.fix or "correct the policy and import again") from None
    have = read_server(client)
    done: list[Callable[[], None]] = []  # how to undo each change made so far
    kept: list[str] = []
    counts = {"deployments": 0, "workflows": 0, "agents": 0, "policy": 0}
    try:
        for did, data in sorted(want.deployments.items()):
            old = have.deployments.get(did)
            if old == data:
                continue
            _put_deployment(client, did, data, exists=old is not None)
            done.append((lambda d=did, o=old: _put_deployment(client, d, o, True)) if old is not None else
                        (lambda d=did: client.request("DELETE", f"/admin/deployments/{d}")))
            counts["deployments"] += 1
        for section in ("workflows", "agents"):
            current: dict[str, str] = getattr(have, section)
            for name, source in sorted(getattr(want, section).items()):
                if current.get(name) == source:
                    continue
                _define(client, section, name, source, want.teams.get(f"{section}/{name}"))
                if name in current:
                    done.append(lambda s=section, n=name, o=current[name], t=have.teams.get(f"{section}/{name}"):
                                _define(client, s, n, o, t))
                else:
                    kept.append(f"{section}/{name}")  # the API deletes no definition: named in the error
                counts[section] += 1
        if want.policy is not None and want.policy != have.policy:
            # Last: a refusal of anything before it leaves the policy as it was (and nothing can fail after it).
            _set_policy(client, want.policy)  # active on every process within a second (PUT /admin/policy)
            counts["policy"] = 1
    except RemoteError as exc:
        for undo in reversed(done):
            undo()
        also = f"; newly defined and kept (no delete API): {', '.join(kept)}" if kept else ""
        raise ConfigImportError(f"the server refused the import ({exc.code}): {exc.detail}; the "
                                f"{len(done)} change(s) made before it were put back{also}",
                                fix=exc.fix or "correct the definition it names and import again") from None
    return counts
