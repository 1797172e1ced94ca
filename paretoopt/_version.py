"""The package version, in a module of its own: any module can read it without importing
the package root (whose lazy names reach every stage)."""

__version__ = "0.1.0"
