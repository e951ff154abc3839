"""Evaluation of trained models: physics metrics, plots and reports."""
