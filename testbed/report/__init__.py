"""After the runs: leakage tables, plots and the markdown summary read back from MLflow."""
