"""Validators `keel config import` runs on every file before changing anything: each capability's own
parser, so a file the server would refuse is named with its field before the first definition changes.
Top level (like app.py and cli.py) because it reaches into every capability."""

from __future__ import annotations

import yaml
from pydantic import ValidationError

from keel.agents.mandate import parse_mandate
from keel.core.config_io import Validator
from keel.core.errors import ValidationFailed
from keel.core.settings import DeploymentConfig
from keel.gateway.deployments import options_problem
from keel.governance.policy.model import parse_policy
from keel.workflows.spec import parse_spec


def deployment(text: str, where: str) -> None:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValidationFailed(f"not valid YAML: {getattr(exc, 'problem', exc)}", fix="correct the YAML") from None
    if not isinstance(data, dict):
        raise ValidationFailed("a deployment must be a mapping", fix="start with `alias: …`")
    try:
        cfg = DeploymentConfig(**{k: v for k, v in data.items() if k != "id"}, id=data.get("id"))
    except (ValidationError, TypeError) as exc:
        errors = exc.errors() if isinstance(exc, ValidationError) else [{"loc": ("?",), "msg": str(exc)}]
        raise ValidationFailed(", ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors),
                               fix="correct the named fields") from None
    problem = options_problem(cfg)
    if problem is not None:
        raise problem


def validators() -> dict[str, Validator]:
    return {
        "deployments": deployment,
        "workflows": lambda text, where: parse_spec(text) and None,
        "agents": lambda text, where: parse_mandate(text) and None,
        "policy": lambda text, where: parse_policy(text, where) and None,
    }
