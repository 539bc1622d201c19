"""The federation engine: config schema, data, models, Ray runtime, round loop, MLflow tracking, CLI."""

__version__ = "0.1.0"
