"""Experiment tracking, rank 0 only: a local metrics.jsonl always, plus Comet (online with COMET_API_KEY, else an
offline archive in the run directory). `make_tracker` is the one place that decides what a process logs to."""

from hepml_dist.track.tracker import CometTracker, LocalTracker, MultiTracker, NullTracker, Tracker, make_tracker

__all__ = ["CometTracker", "LocalTracker", "MultiTracker", "NullTracker", "Tracker", "make_tracker"]
