"""Model directories: the demo model writer, validation without MLX, prompt token counting."""

# A registered model's name, as both exoctl (before sending) and exod (on receipt) check it.
# Kept here, free of imports, so that exoctl can use it without loading the daemon's modules.
MODEL_NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,63}"
