"""Evaluation: the loop over batches shared by validation, evaluate, report and predict; physics metrics reduced
over all ranks; plots; `hepml evaluate` and the `hepml report` page."""
