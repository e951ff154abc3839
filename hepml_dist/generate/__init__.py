"""Physics data generators: Pythia 8 collisions, a parametrised detector, jets and labels, written as shards.

`hepml data generate PROCESS` runs one of the processes below (docs/generators.md describes the physics and its
limits). A process module is imported when its process is asked for; Pythia itself (the optional `gen` extra) only
when events are generated.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from hepml_dist.errors import UserError

if TYPE_CHECKING:
    from hepml_dist.generate.base import Process

PROCESS_MODULES: dict[str, str] = {
    "fcc-tau": "hepml_dist.generate.fcc_tau",
    "jetclass-lite": "hepml_dist.generate.jetclass_lite",
    "jetclass2-lite": "hepml_dist.generate.jetclass2_lite",
    "clic-events": "hepml_dist.generate.clic_events",
    "events-met": "hepml_dist.generate.events_met",
}


def get_process(name: str) -> Process:
    """The Process called `name`; a UserError listing the choices if there is none."""
    if name not in PROCESS_MODULES:
        raise UserError(f"unknown process {name!r}; choose one of {', '.join(PROCESS_MODULES)}")
    return importlib.import_module(PROCESS_MODULES[name]).PROCESS


__all__ = ["PROCESS_MODULES", "get_process"]
