"""Safe column expressions for conversion schemas: `part_charge`, `pt(reco_jet_p4)`, `where(dm >= 0, 1, 0)`.

A schema maps each stored column to an expression over the input branches (ROOT) or columns (parquet). The
expression is parsed with `ast` and only names, numbers, arithmetic, comparisons, `& | ~`, attribute access to
record fields (`p4.x`) and the functions below are allowed, so a schema file cannot run arbitrary code. Length,
nesting and powers of constants are bounded too, so that checking or evaluating an expression always ends quickly.
Expressions work on awkward arrays (jagged per-constituent quantities) and numpy arrays alike.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

import awkward as ak
import numpy as np

from hepml_dist.errors import UserError

# field names of the 4-vector records found in HEP ntuples (FCC tau files use several conventions)
_X, _Y, _Z = ("x", "px", "fX"), ("y", "py", "fY"), ("z", "pz", "fZ")
_T = ("t", "tau", "E", "e", "energy", "fE")
_RHO, _ETA, _PHI, _M = ("rho", "pt", "pT"), ("eta",), ("phi",), ("mass", "m", "M")


def _fields(v) -> list[str]:
    return list(ak.fields(v)) if isinstance(v, ak.Array) else []


def _field(v, names: tuple[str, ...]):
    for name in names:
        if name in _fields(v):
            return v[name]
    return None


def _vector_error(v, what: str) -> UserError:
    return UserError(f"cannot take {what} of a record with fields {_fields(v)}; expected 4-vector fields "
                     "(x, y, z, t|tau|E) or (rho|pt, eta, phi, t|tau|E|mass)")


def _px(v):
    if (x := _field(v, _X)) is not None:
        return x
    rho, phi = _field(v, _RHO), _field(v, _PHI)
    if rho is None or phi is None:
        raise _vector_error(v, "px")
    return rho * np.cos(phi)


def _py(v):
    if (y := _field(v, _Y)) is not None:
        return y
    rho, phi = _field(v, _RHO), _field(v, _PHI)
    if rho is None or phi is None:
        raise _vector_error(v, "py")
    return rho * np.sin(phi)


def _pz(v):
    if (z := _field(v, _Z)) is not None:
        return z
    rho, eta = _field(v, _RHO), _field(v, _ETA)
    if rho is None or eta is None:
        raise _vector_error(v, "pz")
    return rho * np.sinh(eta)


def _pt(v):
    if (rho := _field(v, _RHO)) is not None:
        return rho
    return np.hypot(_px(v), _py(v))


def _energy(v):
    if (t := _field(v, _T)) is not None:
        return t
    m = _field(v, _M)
    if m is None:
        raise _vector_error(v, "energy")
    return np.sqrt(_px(v) ** 2 + _py(v) ** 2 + _pz(v) ** 2 + m**2)


def _eta(v):
    if (eta := _field(v, _ETA)) is not None:
        return eta
    return np.arcsinh(_pz(v) / np.maximum(_pt(v), 1e-12))


def _phi(v):
    if (phi := _field(v, _PHI)) is not None:
        return phi
    return np.arctan2(_py(v), _px(v))


def _mass(v):
    if (m := _field(v, _M)) is not None:
        return m
    e, px, py, pz = _energy(v), _px(v), _py(v), _pz(v)
    return np.sqrt(np.maximum(e**2 - px**2 - py**2 - pz**2, 0.0))


def _where(condition, a, b):
    if any(isinstance(x, ak.Array) for x in (condition, a, b)):
        return ak.where(condition, a, b)
    return np.where(condition, a, b)


def _clip(x, lo, hi):
    return np.minimum(np.maximum(x, lo), hi)


def _finite_or(x, value):
    """x where it is finite, else `value` (e.g. targets that are undefined for background jets)."""
    with np.errstate(all="ignore"):
        return _where(np.isfinite(x), x, value)


def _onehot_index(*flags):
    """Index of the first true flag among the arguments (one-hot label branches), -1 if none is set."""
    out = None
    for index in reversed(range(len(flags))):
        flag = flags[index]
        out = _where(flag != 0, index, -1 if out is None else out)
    return out


def _pid_from_flags(charge, charged_hadron, neutral_hadron, photon, electron, muon):
    """Reduced PDG id with the sign of the charge (e-: 11, mu-: 13, pi+: 211, gamma: 22, K0L: 130) from flags."""
    pid = _where(neutral_hadron != 0, 130, 0)
    pid = _where(charged_hadron != 0, 211 * charge, pid)
    pid = _where(photon != 0, 22, pid)
    pid = _where(muon != 0, -13 * charge, pid)
    return _where(electron != 0, -11 * charge, pid)


_TAU_REDUCED = np.full(17, 5, dtype=np.int64)  # full decay modes 0..16 -> 0..5 (HEP-KBFI/ml-tau-en-reg ad3edb7 enreg/tools/general.py)
_TAU_REDUCED[[0]] = 0
_TAU_REDUCED[[1]] = 1
_TAU_REDUCED[[2, 3, 4]] = 2
_TAU_REDUCED[[5, 10]] = 3
_TAU_REDUCED[[6, 7, 8, 9, 11, 12, 13, 14]] = 4


def _tau_decay_mode_reduced(dm):
    """Full tau decay mode (0..15) -> the 6 MultiParTau classes; -1 (not a tau) stays -1."""
    dm = np.asarray(dm).astype(np.int64)
    return np.where(dm < 0, -1, _TAU_REDUCED[np.clip(dm, 0, 16)])


def _mlpf_class(pdg):
    """PDG id -> MLPF class: 0 none, 1 charged hadron, 2 neutral hadron, 3 photon, 4 electron, 5 muon."""
    a = abs(pdg)
    out = _where(a != 0, 2, 0)
    out = _where((a == 211) | (a == 321) | (a == 2212), 1, out)
    out = _where(a == 22, 3, out)
    out = _where(a == 11, 4, out)
    return _where(a == 13, 5, out)


def _column(x, index):
    """The `index`-th entry of the innermost axis (e.g. one feature of per-element feature lists)."""
    return x[..., int(index)]


def _concat_elements(*groups, width: int | None = None):
    """Concatenate per-event element lists (tracks first), each padded with zeros to `width` features."""
    parts = []
    for group in groups:
        if width is not None:
            group = ak.fill_none(ak.pad_none(group, int(width), axis=2, clip=True), 0.0)
        parts.append(group)
    return ak.concatenate(parts, axis=1)


def _num(x):
    return ak.num(x, axis=1)


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "abs": np.abs, "sqrt": np.sqrt, "log": np.log, "exp": np.exp, "sin": np.sin, "cos": np.cos,
    "tan": np.tan, "tanh": np.tanh, "sinh": np.sinh, "cosh": np.cosh, "arcsinh": np.arcsinh,
    "arctan2": np.arctan2, "hypot": np.hypot, "minimum": np.minimum, "maximum": np.maximum, "sign": np.sign,
    "where": _where, "clip": _clip, "finite_or": _finite_or,
    "px": _px, "py": _py, "pz": _pz, "pt": _pt, "eta": _eta, "phi": _phi, "energy": _energy, "mass": _mass,
    "onehot_index": _onehot_index, "pid_from_flags": _pid_from_flags,
    "tau_decay_mode_reduced": _tau_decay_mode_reduced, "mlpf_class": _mlpf_class,
    "column": _column, "concat_elements": _concat_elements, "num": _num,
}
CONSTANTS = {"pi": np.pi}

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow, ast.Mod: operator.mod, ast.FloorDiv: operator.floordiv,
           ast.BitAnd: operator.and_, ast.BitOr: operator.or_, ast.BitXor: operator.xor}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Invert: operator.invert}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge}


MAX_LENGTH = 1000  # characters of one expression: the shipped schemas need at most ~130
MAX_DEPTH = 100  # nesting of one expression (evaluated recursively; a sum of n terms nests n deep)
MAX_EXPONENT = 64  # |exponent| of a power of constants: Python integers make 2**10**10 take forever
KEYWORDS: dict[str, set[str]] = {"concat_elements": {"width"}}  # the only keyword arguments a function takes
_ALLOWED = (ast.Expression, ast.Name, ast.Constant, ast.BinOp, ast.UnaryOp, ast.Compare, ast.Call, ast.Attribute,
            ast.Load, ast.keyword, *_BINARY, *_UNARY, *_COMPARE)


def _shown(expression: str) -> str:
    """The expression as error messages quote it (long ones cut)."""
    text = str(expression)
    return repr(text) if len(text) <= 80 else repr(text[:80]) + f"... ({len(text)} characters)"


def _depth(tree: ast.AST) -> int:
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack += [(child, depth + 1) for child in ast.iter_child_nodes(node)]
    return deepest


def _has_names(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Name) and n.id not in CONSTANTS for n in ast.walk(node))


def _has_power(node: ast.AST) -> bool:
    return any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.Pow) for n in ast.walk(node))


def _constant_value(node: ast.AST) -> float | None:
    """The value of a name-free, power-free arithmetic of numbers; None if it is anything else."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and (value := _constant_value(node.operand)) is not None:
        return _UNARY[type(node.op)](value)
    if isinstance(node, ast.BinOp) and not isinstance(node.op, ast.Pow):
        left, right = _constant_value(node.left), _constant_value(node.right)
        if left is not None and right is not None:
            try:
                return _BINARY[type(node.op)](left, right)
            except ArithmeticError:
                return None
    return None


def _check_power(node: ast.BinOp) -> str | None:
    """Why this power may not be computed (None if it may): a power inside an exponent, or a power of constants
    with a large or non-numeric exponent (numbers are Python integers there, so 9**9**9 would never finish)."""
    if _has_power(node.right):
        return "a power inside an exponent (x**2**3) is not allowed; write the exponent as one number"
    if _has_names(node.left) or _has_names(node.right):
        return None  # arrays: numpy overflows to inf, which the converter reports
    exponent = _constant_value(node.right)
    if _has_power(node.left) or exponent is None or abs(exponent) > MAX_EXPONENT:
        return (f"a power of constants needs a plain exponent of at most {MAX_EXPONENT} and a base without ** "
                f"(write the number itself)")
    return None


def _node_problem(node: ast.AST) -> str | None:
    """Why one node of an expression is not allowed, or None."""
    if not isinstance(node, _ALLOWED):
        return (f"{type(node).__name__} is not allowed (use names, numbers, arithmetic, comparisons, & | ~, "
                f"record fields and the functions {sorted(FUNCTIONS)})")
    if isinstance(node, ast.Call):
        if not (isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS):
            return f"unknown function {ast.unparse(node.func)!r}; available: {sorted(FUNCTIONS)}"
        allowed = KEYWORDS.get(node.func.id, set())
        if bad := [k.arg or "**" for k in node.keywords if k.arg not in allowed]:
            return f"{node.func.id}() takes no keyword argument {bad[0]!r}" + (
                f" (only {sorted(allowed)})" if allowed else "")
    if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
        return f"field {node.attr!r} is not allowed"
    if isinstance(node, ast.Constant) and not isinstance(node.value, int | float | bool):
        return "only numbers are allowed as constants"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        return _check_power(node)
    return None


@lru_cache(maxsize=512)
def parse(expression: str) -> ast.Expression:
    """Parse and check an expression; UserError naming the offending part if it is not allowed."""
    text = str(expression)
    if len(text) > MAX_LENGTH:
        raise UserError(f"expression {_shown(text)}: longer than {MAX_LENGTH} characters; split it into several "
                        "columns or shorten it")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as err:
        raise UserError(f"expression {_shown(text)}: {err.msg}") from None
    except (RecursionError, MemoryError):
        raise UserError(f"expression {_shown(text)}: nested too deeply (at most {MAX_DEPTH} levels)") from None
    if _depth(tree) > MAX_DEPTH:
        raise UserError(f"expression {_shown(text)}: nested too deeply (at most {MAX_DEPTH} levels)")
    for node in ast.walk(tree):
        if problem := _node_problem(node):
            raise UserError(f"expression {_shown(text)}: {problem}")
    return tree


def inputs_of(expression: str) -> set[str]:
    """The input branches/columns an expression reads."""
    tree = parse(expression)
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} - called - set(CONSTANTS)


def evaluate(expression: str, inputs: Mapping[str, Any]) -> Any:
    """Evaluate an expression on a mapping of input arrays."""
    tree = parse(expression)

    def run(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return run(node.body)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in CONSTANTS:
                return CONSTANTS[node.id]
            if node.id not in inputs:
                raise UserError(f"expression {_shown(expression)}: no input branch/column {node.id!r}")
            return inputs[node.id]
        if isinstance(node, ast.Attribute):
            value = run(node.value)
            if node.attr not in _fields(value):
                raise UserError(f"expression {_shown(expression)}: no field {node.attr!r} (fields: {_fields(value)})")
            return value[node.attr]
        if isinstance(node, ast.BinOp):
            return _BINARY[type(node.op)](run(node.left), run(node.right))
        if isinstance(node, ast.UnaryOp):
            return _UNARY[type(node.op)](run(node.operand))
        if isinstance(node, ast.Compare):
            result, left = None, run(node.left)
            for op, right_node in zip(node.ops, node.comparators, strict=True):
                right = run(right_node)
                term = _COMPARE[type(op)](left, right)
                result = term if result is None else result & term
                left = right
            return result
        if isinstance(node, ast.Call):
            args = [run(a) for a in node.args]
            kwargs = {k.arg: run(k.value) for k in node.keywords}
            return FUNCTIONS[node.func.id](*args, **kwargs)
        raise UserError(f"expression {_shown(expression)}: cannot evaluate {type(node).__name__}")

    try:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return run(tree)
    except UserError:
        raise
    except (ArithmeticError, TypeError, ValueError, IndexError) as err:  # a function or operator refused its inputs
        raise UserError(f"expression {_shown(expression)}: cannot evaluate it ({type(err).__name__}: "
                        f"{_first_line(err)})") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""
