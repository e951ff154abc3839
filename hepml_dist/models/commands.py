"""The parameter count of a job's model (`hepml show --params`, `hepml jobs --params`): builds the model, so it
imports torch; the commands import this module only when asked for a count."""

from hepml_dist.models import count_parameters
from hepml_dist.spec import JobSpec


def parameters(spec: JobSpec) -> str:
    """The model's parameter count, or why it cannot be counted."""
    try:
        return str(count_parameters(spec))
    except (KeyError, ModuleNotFoundError) as err:
        return f"unknown ({err})"
