"""Shared base classes of the job spec: every section, and every family's model section.

Every section forbids unknown keys (a typo in a job file must be an error, not a silently ignored
field), refuses NaN and infinite numbers and `true`/`false` where a number belongs (YAML would otherwise make
`epochs: true` one epoch), and takes its field documentation from the docstring written under each field.
"""

import types
import typing
from collections.abc import Iterator, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


class Section(BaseModel):
    """A job-spec section: unknown keys are errors, field docstrings become descriptions."""

    model_config = ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        validate_default=True,
        protected_namespaces=(),
        allow_inf_nan=False,
    )

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name) if isinstance(name, str) else None
                if isinstance(value, bool) and field is not None:
                    admitted = _types_in(field.annotation)
                    if bool not in admitted and admitted & {int, float}:
                        raise ValueError(f"{name}: expected a number, not {str(value).lower()}")
        return data


def _types_in(annotation: Any) -> set[Any]:
    """The plain types an annotation admits (int | None -> {int, NoneType})."""
    args = typing.get_args(annotation)
    if not args or typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return {annotation}
    return set().union(*(_types_in(a) for a in args))


Finding = tuple[str, str]
"""One problem found by a cross-field rule: (field path, message)."""


class ModelSection(Section):
    """Base of every family's model spec: the checks that depend on the family are methods of its own spec."""

    def attention_widths(self) -> Iterator[tuple[str, int, str, int]]:
        """(width field, width, heads field, heads) of each attention of the model; the width must divide by the
        number of heads."""
        return iter(())

    def check(self, tasks: Sequence[Any]) -> Iterator[Finding]:
        """Family rules that also involve the job's tasks (TaskSpec list)."""
        return iter(())
