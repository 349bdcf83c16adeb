"""Fuzz targets (atheris) for the parts that read untrusted or hand-written input."""
