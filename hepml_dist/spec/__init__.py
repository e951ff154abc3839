"""The job spec: one typed tree (pydantic) per training job, loaded from YAML with `extends` and `--set` overrides."""

from hepml_dist.spec.job import MODEL_FAMILIES, JobSpec
from hepml_dist.spec.loader import Problem, SpecError, apply_overrides, dump_spec, load_job, parse_spec

__all__ = ["MODEL_FAMILIES", "JobSpec", "Problem", "SpecError", "apply_overrides", "dump_spec", "load_job", "parse_spec"]
