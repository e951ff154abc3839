"""The ParT family: Particle Transformer (JetClass), Sophon, MultiParTau and SingleParTau (`model: {family: part}`).

`model.py` is the architecture, `pairs.py` the pair features and their embedding; the losses are the shared task
losses (hepml_dist.models.losses). Importing the package registers the family.
"""

from hepml_dist.models.losses import task_losses
from hepml_dist.models.part.model import ParticleTransformer, build, use_static_shapes
from hepml_dist.models.registry import ModelFamily, register_family

FAMILY = register_family(ModelFamily("part", build=build, losses=task_losses, use_static_shapes=use_static_shapes))

__all__ = ["FAMILY", "ParticleTransformer", "build"]
