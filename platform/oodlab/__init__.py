"""oodlab: distributed experimentation platform for out-of-distribution detection."""

__version__ = "0.1.0"
