"""Composing trainings: pipelines of stages, population search, and validation of a composed run."""
