"""Model directories: the demo model writer, validation without MLX, prompt token counting."""
