"""Evaluation: physics metrics reduced over all ranks, plots, and the `hepml evaluate` report of a trained run."""
