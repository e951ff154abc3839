"""Launching jobs on clusters: the Ray Jobs API client (`ray_jobs.py`) and SLURM rendering and submission (`slurm.py`)."""
