"""Evaluation: toy metrics on held-out synthetic scenes, generation backends (``fedsim.eval``)."""
