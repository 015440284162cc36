"""Registering and reading templates.

``templates.tags`` and the ``template_tags`` rows are written together here
and nowhere else, so the two never disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.errors import TemplateError, TemplateNotFound
from models.sandbox import required_variables
from models.tables import Template, TemplateTag
from models.types import label_problem, unstorable_text

#: Names the system passes to every render; a template may not claim them.
RESERVED_NAMES = frozenset({"job", "document"})


@dataclass(frozen=True)
class TemplateSpec:
    """A template as a user registers it."""

    name: str
    content: str
    description: str | None = None
    category: str | None = None
    tags: Sequence[str] = field(default_factory=tuple)


def _normalize_tags(tags: Sequence[str]) -> list[str]:
    cleaned = {tag.strip().lower() for tag in tags if tag.strip()}
    return sorted(cleaned)


#: Longest name, category or tag, as the columns allow.
MAX_LABEL_CHARS = 255
#: Largest template source; real templates are a few kilobytes.
MAX_TEMPLATE_CHARS = 1024 * 1024


def _check_label(value: str | None, what: str) -> None:
    problem = None if value is None else label_problem(value, MAX_LABEL_CHARS)
    if problem:
        raise TemplateError(f"{what} {problem}")


def register_template(session: Session, spec: TemplateSpec) -> Template:
    """Check a template and insert it, or replace the one with the same name.

    A replacement takes every field from ``spec``: a description, category or
    tags left out are cleared.
    """
    _check_label(spec.name, "a template name")
    if len(spec.content) > MAX_TEMPLATE_CHARS:
        raise TemplateError(
            f"template {spec.name!r} has {len(spec.content)} characters; "
            f"the limit is {MAX_TEMPLATE_CHARS}"
        )
    _check_label(spec.category, "a category")
    for tag in spec.tags:
        _check_label(tag, f"tag {tag[:40]!r}")
    problem = unstorable_text(spec.content)
    if problem:
        raise TemplateError(f"template {spec.name!r} contains {problem}")
    problem = unstorable_text(spec.description or "")
    if problem:
        raise TemplateError(f"the description contains {problem}")
    variables = required_variables(spec.content)
    reserved = RESERVED_NAMES.intersection(variables)
    if reserved:
        raise TemplateError(f"template uses reserved variable(s): {sorted(reserved)}")
    tags = _normalize_tags(spec.tags)

    template = session.scalar(select(Template).where(Template.name == spec.name))
    if template is None:
        template = Template(name=spec.name)
        session.add(template)
    template.content = spec.content
    template.description = spec.description
    template.category = spec.category
    template.variables = variables
    template.tags = tags
    # Old tag rows go first: the unit of work would insert before it deletes.
    template.tag_rows.clear()
    session.flush()
    template.tag_rows = [TemplateTag(tag=tag) for tag in tags]
    session.flush()
    return template


def get_template(session: Session, name: str) -> Template:
    template = session.scalar(select(Template).where(Template.name == name))
    if template is None:
        raise TemplateNotFound(name)
    return template


def list_templates(session: Session) -> list[Template]:
    return list(session.scalars(select(Template).order_by(Template.name)))
