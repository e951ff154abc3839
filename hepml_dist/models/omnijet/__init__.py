"""The OmniJet-alpha family (`model: {family: omnijet}`): the VQ-VAE tokenizer, the generative GPT backbone and the
classifier that fine-tunes it. `model.py` is the architecture of the three stages, `losses.py` their losses and
validation metrics. Importing the package registers the family."""

from hepml_dist.models.omnijet.losses import omnijet_losses, summed_metrics
from hepml_dist.models.omnijet.model import Classifier, Generator, Tokenizer, build
from hepml_dist.models.registry import ModelFamily, register_family

FAMILY = register_family(ModelFamily("omnijet", build=build, losses=omnijet_losses, metrics=summed_metrics))

__all__ = ["FAMILY", "Classifier", "Generator", "Tokenizer", "build"]
