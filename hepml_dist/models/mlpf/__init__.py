"""The MLPF family (`model: {family: mlpf}`): attention-based particle-flow reconstruction of detector elements
(jpata/particleflow v2.2.0, CLIC). `model.py` is the architecture, `losses.py` the particleflow losses. Importing
the package registers the family."""

from hepml_dist.models.mlpf.losses import mlpf_losses
from hepml_dist.models.mlpf.model import Mlpf
from hepml_dist.models.registry import ModelFamily, register_family

FAMILY = register_family(ModelFamily("mlpf", build=Mlpf, losses=mlpf_losses, examples="events"))

__all__ = ["FAMILY", "Mlpf"]
