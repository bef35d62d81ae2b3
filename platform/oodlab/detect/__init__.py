"""Detection: model outputs, post-hoc scores, metrics, the detector, evaluation."""
