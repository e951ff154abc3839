"""Generates docs/job-reference.md, the field-by-field reference of the job spec, from the field docstrings.

Run `python -m hepml_dist.spec.reference > docs/job-reference.md`; a test keeps the file in sync with the code.
"""

import re
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from hepml_dist.spec.job import JobSpec
from hepml_dist.spec.loader import _models_in


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(str(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type):
        return annotation.__name__
    text = str(annotation).replace("typing.", "")
    for noise in ("hepml_dist.spec.", "Annotated[", "NoneType"):
        text = text.replace(noise, "None" if noise == "NoneType" else "")
    text = re.sub(r"\b[a-z_]+\.([A-Z]\w*)", r"\1", text)  # drop module prefixes
    return text.replace("|", "\\|")


def _default(field: Any) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{value!r}`"


def _section(model: type[BaseModel], path: str, out: list[str], seen: set[str]) -> None:
    if path in seen:
        return
    seen.add(path)
    title = path or "top level"
    doc = (model.__doc__ or "").strip().splitlines()[0]
    out += [f"## `{title}`", "", doc, "", "| field | type | default | meaning |", "|---|---|---|---|"]
    nested: list[tuple[str, type[BaseModel]]] = []
    for name, field in model.model_fields.items():
        description = " ".join((field.description or "").split())
        out.append(f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | {description} |")
        for sub in _models_in(field.annotation):
            key = f"{path}.{name}" if path else name
            if sub.__name__.endswith("ModelSpec"):
                key = f"model ({sub.model_fields['family'].default})"
            nested.append((key, sub))
    out.append("")
    for key, sub in nested:
        _section(sub, key, out, seen)


def render() -> str:
    out = [
        "# Job spec reference",
        "",
        "Generated from the field docstrings in `hepml_dist/spec/` by `python -m hepml_dist.spec.reference`;",
        "do not edit by hand. See [jobs.md](jobs.md) for how to write a job.",
        "",
    ]
    _section(JobSpec, "", out, set())
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
