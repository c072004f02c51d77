"""Running one training: run setup, the loops, metrics, distributed workers, the train entry."""
