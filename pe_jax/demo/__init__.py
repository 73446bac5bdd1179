"""The coloured-shapes demo: synthetic data, and an optional check of the exported weights in open_clip."""
