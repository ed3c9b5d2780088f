"""The one version string of pleas."""
__version__ = "0.2.0"
