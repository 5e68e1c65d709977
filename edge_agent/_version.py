"""The package version: the lowest module, so anything may read it without importing the package."""

__version__ = "0.1.0"
