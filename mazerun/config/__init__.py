"""The run's configuration as data: schemas of the YAML groups and tuned defaults per env."""
