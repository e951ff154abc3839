"""Shared base class for every section of the job spec.

Every section forbids unknown keys (a typo in a job file must be an error, not a silently ignored
field) and takes its field documentation from the docstring written under each field.
"""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A job-spec section: unknown keys are errors, field docstrings become descriptions."""

    model_config = ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        validate_default=True,
        protected_namespaces=(),
    )
