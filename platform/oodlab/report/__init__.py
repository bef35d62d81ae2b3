"""Reports: multi-seed result tables and the cross-method report from MLflow."""
