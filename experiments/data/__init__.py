"""Datasets for the experiments; everything is generated or read locally."""
