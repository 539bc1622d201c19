"""Bridges from other federated-learning frameworks to the testbed's audit path (attacks, scoring, MLflow)."""
