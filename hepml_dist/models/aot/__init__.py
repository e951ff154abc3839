"""The AnalysisObjectTransformer family (`model: {family: aot}`): event classification from reconstructed objects
plus event-level features. `model.py` is the architecture; the losses are the shared task losses. Importing the
package registers the family."""

from hepml_dist.models.aot.model import AnalysisObjectTransformer, build
from hepml_dist.models.losses import task_losses
from hepml_dist.models.registry import ModelFamily, register_family

FAMILY = register_family(ModelFamily("aot", build=build, losses=task_losses, examples="events"))

__all__ = ["FAMILY", "AnalysisObjectTransformer", "build"]
