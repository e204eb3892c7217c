"""The software version, in a module of its own so that any layer can read it without
importing the package root (which reaches up to the client's model classes)."""

__version__ = "0.1.0"
