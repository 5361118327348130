"""magic-pl: training-free model merging with MAGIC magnitude calibration."""
__version__ = "0.1.0"
