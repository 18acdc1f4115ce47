"""Runners: the MLX subprocess, the pipe that frames its messages, and their supervision."""
