"""Experiment tracking of studies and trials (MLflow); imported only by the search layer."""
