"""Tracking: MLflow runs, metrics, figures, and detectors as pyfunc models."""
