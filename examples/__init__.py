"""Runnable examples, installed as ``netpool.examples`` so the CLI finds them after ``pip install``."""
