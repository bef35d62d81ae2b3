"""Search: Ray Tune + Optuna over specs, and promotion of the best run to champion."""
