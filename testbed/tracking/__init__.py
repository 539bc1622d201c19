"""Stage 4, what a run leaves: the MLflow store (and its pre-flight checks), checkpoints, progress."""
