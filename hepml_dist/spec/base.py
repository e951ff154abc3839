"""Shared base classes of the job spec: every section, and every family's model section.

Every section forbids unknown keys (a typo in a job file must be an error, not a silently ignored
field) and takes its field documentation from the docstring written under each field.
"""

from collections.abc import Iterator, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A job-spec section: unknown keys are errors, field docstrings become descriptions."""

    model_config = ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        validate_default=True,
        protected_namespaces=(),
    )


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
