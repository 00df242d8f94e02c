"""sijax: diffusion-based anomaly localization with exact selective p-values."""

__version__ = "0.1.0"
