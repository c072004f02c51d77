"""mazerun: record, clone, fine-tune and evaluate policies from one Hydra-driven `run` command."""

__version__ = "0.1.0"
