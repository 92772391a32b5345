"""Errors a workflow author can cause: an invalid spec, or a template that fails at run time."""

from __future__ import annotations

from typing import Any

from keel.core.errors import KeelError

SPEC_DOCS = "see docs/workflows.md (linked from the README) for the spec format"


def format_location(error: dict[str, Any]) -> str:
    """`line 12, column 5: steps[2].url: message` (the location part left out where unknown)."""
    where = ""
    if error.get("line") is not None:
        where = f"line {error['line']}, column {error['column']}: " if error.get("column") is not None \
            else f"line {error['line']}: "
    return f"{where}{error['field']}: {error['message']}"


class SpecError(KeelError):
    """The workflow spec is invalid; `errors` lists every problem with its line, column and field."""

    code, status, title = "workflow_spec_invalid", 422, "Invalid workflow spec"

    def __init__(self, errors: list[dict[str, Any]], **ids: Any) -> None:
        if not errors:
            raise ValueError("SpecError needs at least one error")
        detail = format_location(errors[0])
        if len(errors) > 1:
            detail += f" (and {len(errors) - 1} more)"
        super().__init__(detail, fix=SPEC_DOCS, errors=list(errors), **ids)
        self.errors = list(errors)


class TemplateError(KeelError):
    """A template failed to render at run time (undefined variable, forbidden attribute, bad syntax)."""

    code, status, title = "workflow_template_error", 422, "Workflow template error"
