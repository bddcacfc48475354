"""maenas-ray: label-free NAS (MAE-driven DARTS) on Ray."""

__version__ = "0.1.0"
