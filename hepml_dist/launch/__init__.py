"""Launching jobs on clusters: the Ray Jobs API client (and SLURM rendering, in its own module)."""
