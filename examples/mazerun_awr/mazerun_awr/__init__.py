"""Advantage-weighted regression for mazerun: the algorithm in ``awr.py``, its settings in ``algorithm/awr.yaml``."""
