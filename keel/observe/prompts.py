"""The prompt registry: versioned chat templates with movable labels (`production`, `staging`, …).

A prompt is a list of chat messages whose contents may hold `{{ variable }}` slots. Each change is a new,
immutable version; a label names one version and moves (moving `production` back is a roll back). Callers
refer to `name@label`, `name@3` or `name` (its `production` label, else the latest version); the rendered
messages come before the caller's own, and the ledger row and span of the call name `name@version`.

Prompts belong to a team like workflows do: a global prompt changes only by admins, a team's only by its
builders (and admins); everyone reads the global ones and their own team's (others get the 404 of an
unknown name), so a member may use a prompt it cannot change.

>>> reg = Prompts(store)
>>> reg.define(builder, {"name": "support-reply", "messages": [{"role": "system", "content": "Hi {{ who }}"}],
...                      "labels": ["staging"]})
>>> reg.resolve(member, "support-reply@staging", {"who": "Ada"}).messages
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from keel.core.clock import utcnow
from keel.core.db import Store, metadata
from keel.core.errors import BadRequest, Conflict, Forbidden, NotFound
from keel.core.ids import new_id
from keel.identity import ownership
from keel.identity import service as identity
from keel.identity.principal import Principal

TS = sa.DateTime(timezone=True)

prompt_versions = sa.Table(
    "prompt_versions", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("messages", sa.JSON, nullable=False),
    sa.Column("variables", sa.JSON, nullable=False),  # the slot names, in order of first use
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("team_id", sa.String(40), nullable=True),
    sa.Column("created_by", sa.String(40), nullable=False),
    sa.Column("created_at", TS, nullable=False),
    sa.UniqueConstraint("name", "version", name="uq_prompt_versions_name_version"),
)

prompt_labels = sa.Table(
    "prompt_labels", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("label", sa.String(40), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("updated_by", sa.String(40), nullable=False),
    sa.Column("updated_at", TS, nullable=False),
)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
LABEL = re.compile(r"[a-z][a-z0-9_-]{0,39}")
SLOT = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
ROLES = ("system", "developer", "user", "assistant")
MAX_MESSAGES, MAX_CONTENT = 50, 100_000
DEFAULT_LABEL = "production"
_FIELDS = {"name", "messages", "template", "description", "labels", "team"}


class PromptVariableMissing(BadRequest):
    """A referenced prompt needs a variable the caller did not send."""

    code = "prompt_variable_missing"


@dataclass(frozen=True)
class Rendered:
    """A resolved reference: the version used (`name@version`) and its messages with the variables filled in."""

    ref: str
    messages: list[dict[str, str]]


def slots(messages: list[dict[str, str]]) -> list[str]:
    seen: dict[str, None] = {}
    for m in messages:
        for name in SLOT.findall(m["content"]):
            seen.setdefault(name)
    return list(seen)


def render(messages: list[dict[str, str]], variables: dict[str, Any], ref: str) -> list[dict[str, str]]:
    """Fill every `{{ name }}` slot; a missing variable is a 400 naming it. Values are inserted as text once
    (a value holding `{{ x }}` stays literal)."""
    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in variables:
            raise PromptVariableMissing(f"prompt {ref} needs variable {name!r}", prompt=ref,
                                        fix=f'send "variables": {{"{name}": "…"}} with the prompt reference')
        value = variables[name]
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return [{"role": m["role"], "content": SLOT.sub(fill, m["content"])} for m in messages]


def parse_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """The template's messages from `messages` (a chat list) or `template` (one user message)."""
    if ("messages" in body) == ("template" in body):
        raise BadRequest("send exactly one of `messages` or `template`",
                         fix='e.g. "messages": [{"role": "system", "content": "You answer for {{ product }}."}]')
    if "template" in body:
        raw: Any = [{"role": "user", "content": body["template"]}]
    else:
        raw = body["messages"]
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_MESSAGES:
        raise BadRequest(f"`messages` must be a list of 1 to {MAX_MESSAGES} messages",
                         fix='send [{"role": "system", "content": "…"}, …]')
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or set(m) - {"role", "content"} or m.get("role") not in ROLES \
                or not isinstance(m.get("content"), str) or not m["content"] or len(m["content"]) > MAX_CONTENT:
            raise BadRequest(f"messages[{i}] must be {{role, content}} with role one of {', '.join(ROLES)} and a "
                             f"non-empty text content of at most {MAX_CONTENT} characters", fix=f"fix messages[{i}]")
        if "\x00" in m["content"]:
            raise BadRequest(f"messages[{i}] holds a NUL character", fix="remove it")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise BadRequest(f"prompt name {str(name)[:80]!r} is not valid",
                         fix="use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit")
    return name


def check_label(label: Any) -> str:
    if not isinstance(label, str) or not LABEL.fullmatch(label):
        raise BadRequest(f"label {str(label)[:60]!r} is not valid",
                         fix="use 1-40 lowercase letters, digits, '_' or '-', starting with a letter (e.g. production)")
    return label


def split_ref(ref: Any) -> tuple[str, str | None, int | None]:
    """`name`, `name@label` or `name@3` → (name, label, version)."""
    if not isinstance(ref, str) or len(ref) > 120:
        raise BadRequest("keel.prompt must be a string like 'support-reply@production'",
                         fix="name a prompt as name, name@label or name@version")
    name, _, tail = ref.partition("@")
    check_name(name)
    if not tail:
        return name, None, None
    if tail.isdigit() and tail.isascii():
        return name, None, int(tail)
    return name, check_label(tail), None


def sees_all(p: Principal) -> bool:
    return p.is_admin or (p.team_id is None and p.has("audit.read"))


def may_author(p: Principal) -> bool:
    """Builders and admins write prompts (the roles that define workflows)."""
    return p.has("workflows.define")


class Prompts:
    """The registry's service: define, read, diff, label and resolve prompts for a principal."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # -- reading ---------------------------------------------------------------------------------------
    def _visible(self, p: Principal) -> Any:
        t = prompt_versions.c.team_id
        return sa.true() if sees_all(p) else sa.or_(t.is_(None), t == p.team_id)

    def _versions(self, conn: sa.Connection, name: str) -> list[Any]:
        pv = prompt_versions.c
        return conn.execute(sa.select(prompt_versions).where(pv.name == name).order_by(pv.version)).all()

    def _labels(self, conn: sa.Connection, name: str) -> dict[str, int]:
        pl = prompt_labels.c
        return {r.label: r.version for r in conn.execute(sa.select(pl.label, pl.version).where(pl.name == name))}

    def _owned(self, conn: sa.Connection, p: Principal, name: str) -> list[Any]:
        """The versions of `name` if `p` may read it; else the 404 of an unknown prompt."""
        rows = self._versions(conn, name)
        if not rows or not (sees_all(p) or rows[0].team_id is None or rows[0].team_id == p.team_id):
            raise NotFound(f"no prompt {name!r} that this key may read", prompt=name,
                           fix="list the prompts you can use with GET /v1/prompts (`keel prompts list`)")
        return rows

    def list(self, p: Principal) -> list[dict[str, Any]]:
        pv = prompt_versions.c
        with self.store.engine.connect() as conn:
            latest = sa.select(pv.name, sa.func.max(pv.version).label("v")).where(self._visible(p)).group_by(pv.name)
            names = {r.name: r.v for r in conn.execute(latest)}
            labels: dict[str, dict[str, int]] = {}
            for r in conn.execute(sa.select(prompt_labels).where(prompt_labels.c.name.in_(list(names)))):
                labels.setdefault(r.name, {})[r.label] = r.version
            rows = conn.execute(sa.select(prompt_versions).where(
                sa.tuple_(pv.name, pv.version).in_(list(names.items())))).all() if names else []
        return sorted((self._public(r, labels.get(r.name, {})) for r in rows), key=lambda d: d["name"])

    def get(self, p: Principal, name: str, version: int | None = None, label: str | None = None) -> dict[str, Any]:
        with self.store.engine.connect() as conn:
            rows = self._owned(conn, p, check_name(name))
            labels = self._labels(conn, name)
        return self._public(self._pick(rows, labels, name, version, label), labels)

    def versions(self, p: Principal, name: str) -> list[dict[str, Any]]:
        with self.store.engine.connect() as conn:
            rows = self._owned(conn, p, check_name(name))
            labels = self._labels(conn, name)
        return [self._public(r, labels) for r in reversed(rows)]

    def diff(self, p: Principal, name: str, a: int, b: int) -> dict[str, Any]:
        """A unified diff of two versions' messages (one `role: content` block per message)."""
        with self.store.engine.connect() as conn:
            rows = self._owned(conn, p, check_name(name))
        old, new = (self._pick(rows, {}, name, v, None) for v in (a, b))

        def lines(r: Any) -> list[str]:
            return [f"{m['role']}: {line}" for m in r.messages for line in m["content"].splitlines() or [""]]
        text = "\n".join(difflib.unified_diff(lines(old), lines(new), f"{name}@{a}", f"{name}@{b}", lineterm=""))
        return {"object": "prompt.diff", "name": name, "from": a, "to": b, "diff": text}

    @staticmethod
    def _pick(rows: list[Any], labels: dict[str, int], name: str, version: int | None, label: str | None) -> Any:
        if label is not None:
            if label not in labels:
                raise NotFound(f"prompt {name!r} has no label {label!r}", prompt=name, label=label,
                               fix=f"use one of: {', '.join(sorted(labels)) or '(none: label a version first)'}")
            version = labels[label]
        if version is None:
            return rows[-1]
        for r in rows:
            if r.version == version:
                return r
        raise NotFound(f"prompt {name!r} has no version {version}", prompt=name,
                       fix=f"versions are 1 to {rows[-1].version}")

    @staticmethod
    def _public(r: Any, labels: dict[str, int]) -> dict[str, Any]:
        return {"object": "prompt", "name": r.name, "version": r.version, "ref": f"{r.name}@{r.version}",
                "messages": r.messages, "variables": r.variables, "description": r.description,
                "team_id": r.team_id, "labels": sorted(k for k, v in labels.items() if v == r.version),
                "all_labels": labels, "created_by": r.created_by, "created_at": r.created_at.isoformat()}

    # -- resolving (callers, workflows, agents) ---------------------------------------------------------
    def resolve(self, p: Principal, ref: Any, variables: Any = None) -> Rendered:
        """The messages of `ref` (`name`, `name@label`, `name@version`) with `variables` filled in, if `p` may
        read the prompt. A bare name means its `production` label, or the latest version when it has none."""
        if variables is not None and not isinstance(variables, dict):
            raise BadRequest("keel.variables must be an object", fix='send {"variables": {"name": "value"}}')
        name, label, version = split_ref(ref)
        with self.store.engine.connect() as conn:
            rows = self._owned(conn, p, name)
            labels = self._labels(conn, name)
        if label is None and version is None and DEFAULT_LABEL in labels:
            label = DEFAULT_LABEL
        row = self._pick(rows, labels, name, version, label)
        used = f"{name}@{row.version}"
        return Rendered(used, render(row.messages, variables or {}, used))

    # -- writing -------------------------------------------------------------------------------------
    def define(self, p: Principal, body: Any) -> dict[str, Any]:
        """A new version of a prompt (an unchanged one keeps its version), then the `labels` asked for."""
        try:
            return self._define(p, body)
        except sa.exc.IntegrityError:  # another writer took the same version number or label first
            raise Conflict("the prompt changed meanwhile", fix="send it again") from None

    def _define(self, p: Principal, body: Any) -> dict[str, Any]:
        if not may_author(p):
            raise Forbidden(f"key {p.key_id} ({p.role}) may not write prompts", key_id=p.key_id,
                            fix="use a builder key of the prompt's team, or an admin key")
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object",
                             fix='send {"name": "…", "messages": [{"role": "system", "content": "…"}]}')
        unknown = sorted(set(body) - _FIELDS)
        if unknown:
            raise BadRequest(f"unknown field {unknown[0][:60]!r}", fix=f"use only: {', '.join(sorted(_FIELDS))}")
        name = check_name(body.get("name"))
        messages = parse_messages(body)
        description = body.get("description") or ""
        if not isinstance(description, str) or len(description) > 4000:
            raise BadRequest("`description` must be a string of at most 4000 characters", fix="shorten it")
        labels = body.get("labels") or []
        if not isinstance(labels, list) or len(labels) > 20:
            raise BadRequest("`labels` must be a list of at most 20 labels", fix='e.g. ["staging"]')
        labels = [check_label(x) for x in labels]
        team = body.get("team")
        if team is not None and not isinstance(team, str):
            raise BadRequest("`team` must be a team id or name", fix="send a string, or omit it")
        requested = identity.get_team(self.store, team)["id"] if team is not None else None
        with self.store.engine.begin() as conn:
            rows = self._versions(conn, name)
            owner = self._owner(p, name, rows, requested)
            if rows and rows[-1].messages == messages and rows[-1].description == description:
                row, created = rows[-1], False
            else:
                values = {"id": new_id("pmt"), "name": name, "version": rows[-1].version + 1 if rows else 1,
                          "messages": messages, "variables": slots(messages), "description": description,
                          "team_id": owner, "created_by": p.key_id, "created_at": utcnow()}
                conn.execute(prompt_versions.insert().values(**values))
                row = conn.execute(sa.select(prompt_versions).where(prompt_versions.c.id == values["id"])).one()
                created = True
            for label in labels:
                self._set_label(conn, p, name, label, row.version)
            out = self._public(row, self._labels(conn, name))
        return {**out, "created": created}

    def label(self, p: Principal, name: str, label: str, body: Any) -> dict[str, Any]:
        """Point `label` at a version (moving it back is the roll back); only whoever may change the prompt."""
        try:
            return self._label(p, name, label, body)
        except sa.exc.IntegrityError:
            raise Conflict(f"label {label!r} of prompt {name!r} was set meanwhile", fix="send it again",
                           prompt=name) from None

    def _label(self, p: Principal, name: str, label: str, body: Any) -> dict[str, Any]:
        check_label(label)
        if not isinstance(body, dict) or type(body.get("version")) is not int or set(body) - {"version"}:
            raise BadRequest('send {"version": N}', fix="name the version the label should point at")
        with self.store.engine.begin() as conn:
            rows = self._owned(conn, p, check_name(name))
            if not may_author(p):
                raise Forbidden(f"key {p.key_id} ({p.role}) may not move prompt labels", key_id=p.key_id,
                                fix="use a builder key of the prompt's team, or an admin key")
            self._owner(p, name, rows, None)
            row = self._pick(rows, {}, name, body["version"], None)
            self._set_label(conn, p, name, label, row.version)
            return self._public(row, self._labels(conn, name))

    @staticmethod
    def _set_label(conn: sa.Connection, p: Principal, name: str, label: str, version: int) -> None:
        pl = prompt_labels.c
        where = (pl.name == name) & (pl.label == label)
        values = {"version": version, "updated_by": p.key_id, "updated_at": utcnow()}
        if conn.execute(prompt_labels.update().where(where).values(**values)).rowcount == 0:
            conn.execute(prompt_labels.insert().values(name=name, label=label, **values))

    @staticmethod
    def _owner(p: Principal, name: str, rows: list[Any], requested: str | None) -> str | None:
        """The team a change to prompt `name` keeps it in, or the refusal (as for workflows)."""
        return ownership.owner(p, "prompt", name, exists=bool(rows), prev_team=rows[0].team_id if rows else None,
                               requested=requested)
