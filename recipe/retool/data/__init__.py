"""Datasets: hub rows converted to verl parquet (convert.py) and the prep run around it."""
