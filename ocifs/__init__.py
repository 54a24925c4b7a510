"""ocifs: mount an OCI registry as a filesystem."""

__version__ = "0.1.0"
