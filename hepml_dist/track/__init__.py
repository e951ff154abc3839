"""Experiment tracking and the local dashboard.

`tracker.py`: what rank 0 of a training run, `hepml evaluate` and `hepml report` log to (metrics.jsonl always,
TensorBoard and Comet as the job's tracking section says); `make_tracker` is the one place that decides what a
training process logs to. `tensorboard.py`: the TensorBoard event files. `records.py`: reading back what the trackers
left in a run directory. `summary.py` and `commands.py`: `hepml runs`, the table of runs; `compare.py`: `hepml runs
compare`, their curves overlaid. The package imports nothing itself, so that `hepml runs` needs neither torch nor Ray.
"""
