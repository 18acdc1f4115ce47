"""exoctl: the command-line client of exod (run, status, kill, events, models)."""
