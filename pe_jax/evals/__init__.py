"""Evaluations: zero-shot classification and kNN retrieval."""
