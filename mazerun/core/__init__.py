"""Process plumbing every layer may use: errors, the stop flag, progress, schedules, atomic files."""
