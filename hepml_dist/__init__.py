"""hepml_dist: distributed training of transformer models for jets and events (HEP), from one job file."""

__version__ = "0.1.0"
