"""Optional dependencies, grouped in pip extras: the base install trains with DDP, evaluates, reports and tracks to
metrics.jsonl and TensorBoard; the extras add the rest. `require` imports one of them where it is needed, and when
it is missing says which extra to install instead of a bare ModuleNotFoundError."""

import importlib
import importlib.util
from types import ModuleType

from hepml_dist.errors import UserError

EXTRAS = {
    # module: (extra, what needs it)
    "deepspeed": ("deepspeed", "DeepSpeed (ZeRO) training: parallel.strategy = deepspeed"),
    "comet_ml": ("comet", "Comet experiment tracking (tracking.mode online or offline)"),
    "pythia8mc": ("gen", "generating datasets with Pythia 8 (hepml data generate)"),
    "onnxruntime": ("export", "checking ONNX exports against PyTorch (hepml export onnx)"),
}


def install_hint(module: str) -> str:
    extra, needed_for = EXTRAS[module]
    return (f"{needed_for} needs the `{extra}` extra, which is not installed: "
            f"pip install 'hepml-dist[{extra}]' (from a checkout: pip install -e '.[{extra}]')")


def is_installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def require(module: str) -> ModuleType:
    """Import an optional dependency listed in EXTRAS, or raise a UserError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module and not (err.name or "").startswith(module + "."):
            raise  # the extra is installed but broken: its own error says more
        raise UserError(install_hint(module)) from None
