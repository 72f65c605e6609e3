"""Evaluation on AIME with the training tool loop: runner, generation backends, metrics, reports."""
