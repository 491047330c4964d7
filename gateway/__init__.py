"""lockgw gateway."""

__version__ = "0.1.0"
"""The release; the package metadata takes it from here (pyproject.toml)."""
