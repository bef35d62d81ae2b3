"""Training: the Ray Train loop and the one run path (train -> evaluate -> log)."""
