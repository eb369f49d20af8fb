"""Pallas GPU kernels behind nmattn's "pallas_triton" and "pallas_mosaic" backends."""
