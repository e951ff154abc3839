"""Loading job files: YAML parsing, `extends` inheritance, `--set` overrides, validation and error reporting.

Every problem is reported as `file: path.to.field: message`, all at once, so a user fixes a job in one pass.
"""

import copy
import difflib
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from hepml_dist.locations import JOBS_PATH_VARIABLE, find_job, jobs_search_path
from hepml_dist.spec.job import MODEL_FAMILIES, JobSpec
from hepml_dist.spec.rules import check_rules


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a job: which file, which field, and what to do."""

    source: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.path}: {self.message}"


class SpecError(Exception):
    """A job file (or override) that cannot be turned into a valid JobSpec."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


MAX_YAML_VALUES = 100_000
"""More values than any job needs: a file whose aliases expand beyond this (a "billion laughs" bomb) is refused
before anything copies or validates it."""
MAX_YAML_DEPTH = 50
"""The deepest nesting a job file may have; the shipped jobs nest at most 6 levels."""


class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser: `hepml jobs` reads 50 files
    """A safe loader that refuses a key given twice in one mapping (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (the first one would be silently ignored)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _count_values(data: Any, budget: int) -> tuple[int, int]:
    """(values, nesting depth) of `data`, counting shared (aliased) parts at every use, stopping once past `budget`."""
    count, deepest, stack = 0, 0, [(data, 0)]
    while stack and count <= budget:
        item, depth = stack.pop()
        count, deepest = count + 1, max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((value, depth + 1) for value in item.values())
        elif isinstance(item, list):
            stack.extend((value, depth + 1) for value in item)
    return count, deepest


def read_yaml(path: Path) -> dict[str, Any]:
    """Read one YAML mapping (safe loader, unique keys), turning every way it can be wrong into a Problem that
    names the file and, for syntax errors, the line and column."""
    source = str(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise SpecError([Problem(source, "(file)", "no such file; check the path")]) from None
    except IsADirectoryError:
        raise SpecError([Problem(source, "(file)", "is a directory, not a job file")]) from None
    except UnicodeDecodeError as err:
        raise SpecError([Problem(source, "(file)", f"not UTF-8 text (byte {err.start}); a job file is YAML text")]) from None
    except OSError as err:
        raise SpecError([Problem(source, "(file)", f"cannot read: {err.strerror}")]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(yaml)"
        what = getattr(err, "problem", None) or str(err)
        raise SpecError([Problem(source, where, f"YAML syntax error: {what}")]) from None
    except RecursionError:
        raise SpecError([Problem(source, "(yaml)", "nested too deeply to be a job file")]) from None
    values, depth = _count_values(data, MAX_YAML_VALUES)
    if values > MAX_YAML_VALUES:
        raise SpecError([Problem(source, "(yaml)", f"more than {MAX_YAML_VALUES:,} values once aliases are "
                                                   "expanded; a job file is a few hundred")])
    if depth > MAX_YAML_DEPTH:  # libyaml parses deeper than Python can later copy and validate
        raise SpecError([Problem(source, "(yaml)", f"nested too deeply to be a job file ({depth} levels; "
                                                   f"at most {MAX_YAML_DEPTH})")])
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError([Problem(source, "(top level)", f"a job file must be a mapping of sections, not a {type(data).__name__}")])
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Override wins; mappings merge key by key, everything else (lists included) is replaced."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def resolve_extends(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a job file and, recursively, the files it `extends`: names relative to the file's folder, then
    looked up in $HEPML_JOBS_PATH and the shipped jobs (hepml_dist.locations)."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain, path))
        raise SpecError([Problem(str(chain[-1]), "extends", f"cyclic extends: {cycle}")])
    data = read_yaml(path)
    bases = data.pop("extends", None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise SpecError([Problem(str(path), "extends", "must be a file name or a list of file names")])
    merged: dict[str, Any] = {}
    for base in bases:
        found = find_job(base, first=path.parent)
        if found is None:
            searched = ", ".join(str(folder) for folder in jobs_search_path(path.parent))
            raise SpecError([Problem(str(path), "extends", f"base job {base!r} not found (looked in {searched}; "
                                                           f"add a folder to ${JOBS_PATH_VARIABLE} to search it too)")])
        base_path = found.resolve()
        try:
            base_data = resolve_extends(base_path, (*chain, path))
        except SpecError as err:
            if any(p.path == "extends" and "cyclic" in p.message for p in err.problems):
                raise
            raise SpecError([*err.problems, Problem(str(path), "extends", f"base job {base!r} is not usable "
                                                                          "(the problem above)")]) from None
        merged = deep_merge(merged, base_data)
    return deep_merge(merged, data)


def _models_in(annotation: Any) -> Iterable[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from _models_in(arg)


def _suggest(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _format_loc(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for i, item in enumerate(loc):
        if isinstance(item, int):
            parts.append(f"[{item}]")
            continue
        # Drop the tags pydantic adds for union members (the model family, 'literal[...]', 'list[...]').
        if i > 0 and loc[i - 1] == "model" and item in MODEL_FAMILIES:
            continue
        if "[" in item or item in ("str", "int", "float", "bool"):
            continue
        # a key with spaces or control characters is quoted, so one problem stays one line
        parts.append(("." if parts else "") + (item if item.isprintable() and " " not in item else repr(item)))
    return "".join(parts) or "(top level)"


def _section_at(keys: Sequence[Any], data: Any) -> type[BaseModel] | None:
    """The spec section a key path leads to (following model.family for the model union, and list indices into
    lists of sections such as `tasks.0`), or None."""
    model: type[BaseModel] | None = JobSpec
    item: type[BaseModel] | None = None  # the section type of the list the path is in, if any
    node = data
    for key in keys:
        if isinstance(key, int):
            model, item = item, None
            node = node[key] if isinstance(node, list) and -len(node) <= key < len(node) else None
            continue
        if model is None or key not in model.model_fields:
            return None
        annotation = model.model_fields[key].annotation
        node = node.get(key) if isinstance(node, dict) else None
        candidates = list(_models_in(annotation))
        if model is JobSpec and key == "model":
            family = node.get("family") if isinstance(node, dict) else None
            candidates = [m for m in candidates if m.model_fields["family"].default == family] or candidates[:1]
        origin = typing.get_origin(annotation)
        single = candidates[0] if len(candidates) == 1 else None
        model = single if origin not in (list, dict) else None
        item = single if origin is list else None
    return model


def _message(err: dict[str, Any], data: Any) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        name = str(err["loc"][-1])
        keys = [k for k in err["loc"][:-1] if not (isinstance(k, str) and (k in MODEL_FAMILIES or "[" in k))]
        section = _section_at(keys, data)
        return f"unknown field {name!r}{_suggest(name, section.model_fields if section else [])}"
    if kind == "missing":
        return "required field is missing"
    if kind == "union_tag_invalid":
        return f"unknown model family {err['input'].get('family')!r}; use one of {', '.join(MODEL_FAMILIES)}"
    if kind == "union_tag_not_found":
        return f"model.family is missing; use one of {', '.join(MODEL_FAMILIES)}"
    return err["msg"]


def _field_named_in(error: dict[str, Any]) -> str | None:
    """The field a section-level value error starts with (`Value error, epochs: ...`), if it names one."""
    text = str(error.get("ctx", {}).get("error", ""))
    name, sep, _ = text.partition(": ")
    return name if sep and name.isidentifier() else None


def parse_spec(data: dict[str, Any], source: str = "<spec>") -> JobSpec:
    """Validate a mapping into a JobSpec, then apply the cross-field rules; raise SpecError with every problem."""
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as err:
        problems: dict[str, Problem] = {}
        for e in err.errors():
            path = _format_loc(tuple(e["loc"]))
            if e["type"] == "value_error" and (field := _field_named_in(e)):
                # a section's own check that names one of its fields ("epochs: expected a number, not true")
                path, e = f"{path}.{field}" if path else field, {**e, "msg": e["msg"].split(": ", 1)[1]}
            # Union members each report the same field; keep the first message per path.
            problems.setdefault(path, Problem(source, path, _message(e, data)))
        raise SpecError(list(problems.values())) from None
    findings = check_rules(spec)
    if findings:
        raise SpecError([Problem(source, path, message) for path, message in findings])
    return spec


def _check_override_path(data: dict[str, Any], keys: list[str | int], source: str, raw: str) -> None:
    """Reject `--set` paths that name no field, before validation turns them into vaguer errors."""
    for depth, key in enumerate(keys):
        if isinstance(key, int):
            continue  # list indices are checked against the list when the override is applied
        section = _section_at(keys[:depth], data)
        if depth and section is None:
            return  # inside a free-form mapping (e.g. optim.lr_multipliers): any key is fine
        if section is not None and key not in section.model_fields:
            where = _dotted(keys[: depth + 1])
            raise SpecError([Problem(source, where, f"--set {raw}: no such field{_suggest(key, section.model_fields)}")])


def _dotted(keys: Sequence[str | int]) -> str:
    return ".".join(map(str, keys))


def _parse_key(key: str) -> list[str | int]:
    """`tasks.0.weight` -> ["tasks", 0, "weight"]: integer parts (also negative, -1 = last) index lists."""
    return [int(k) if k.lstrip("-").isdigit() else k for k in key.strip().split(".")]


def _check_key(node: Any, key: str | int, where: str, raw: str, source: str) -> None:
    """An override's key fits the node it is applied to: an index in range of a list, a name of a mapping."""
    problem = None
    if isinstance(key, int) and not isinstance(node, list):
        problem = f"{key} indexes a list, and this is not one"
    elif isinstance(key, int) and not -len(node) <= key < len(node):
        problem = f"no item {key} in a list of {len(node)}"
    elif isinstance(key, str) and not isinstance(node, dict):
        problem = f"{key!r} names a field of a mapping, and this is a list"
    if problem:
        raise SpecError([Problem(source, where, f"--set {raw}: {problem}")])


def _child(node: Any, key: str | int, where: str, raw: str, source: str) -> Any:
    """The container at `node[key]` on the way to an override's target (a missing mapping is created)."""
    _check_key(node, key, where, raw, source)
    if isinstance(key, int):
        return node[key]
    if not isinstance(node.get(key), (dict, list)):
        node[key] = {}
    return node[key]


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], source: str = "--set") -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML (so 1e-4, [1, 2], true work). Integer parts index
    lists (`tasks.0.weight=2`, `-1` = the last item); `a.b+=value` appends to a list (a list value extends it)."""
    data = copy.deepcopy(data)
    for raw in overrides:
        key, sep, text = raw.partition("=")
        append = key.endswith("+")
        key = key[:-1] if append else key
        if not sep or not key.strip():
            raise SpecError([Problem(source, raw, "an override looks like section.field=value (or field+=item to "
                                                  "append to a list), e.g. optim.lr=1e-4")])
        keys = _parse_key(key)
        _check_override_path(data, keys, source, raw)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node: Any = data
        for depth, k in enumerate(keys[:-1]):
            node = _child(node, k, _dotted(keys[: depth + 1]), raw, source)
        last, where = keys[-1], _dotted(keys)
        _check_key(node, last, where, raw, source)
        if append:
            current = node[last] if isinstance(last, int) or last in node else []
            if not isinstance(current, list):
                raise SpecError([Problem(source, where, f"--set {raw}: += appends to a list, and {where} is not one")])
            value = [*current, *(value if isinstance(value, list) else [value])]
        node[last] = value
    return data


def load_job(path: str | Path, overrides: Sequence[str] = ()) -> JobSpec:
    """Load a job file: read YAML, resolve `extends`, apply `--set` overrides, validate, check rules.
    A path that is not a file but a bare name (`part-quickstart`) is looked up in $HEPML_JOBS_PATH and the
    shipped jobs."""
    path = Path(path)
    if not path.is_file():
        path = find_job(path) or path  # a missing file is reported by read_yaml, naming the path given
    data = resolve_extends(path)
    data = apply_overrides(data, overrides, source=str(path))
    return parse_spec(data, source=str(path))


def dump_spec(spec: JobSpec) -> str:
    """The fully resolved spec as YAML; loading it again gives the same spec."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False, default_flow_style=None, width=120)
