"""Hyper-parameter searches (`hepml tune`): Ray Tune over any spec field, each trial an ordinary training run."""
