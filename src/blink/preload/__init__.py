"""Pre-loading: the context store (documents to retrieve from), and later the predictor and prefill planner.

The gateway imports this package, so nothing here imports torch: embedders come in as plain functions.
"""
