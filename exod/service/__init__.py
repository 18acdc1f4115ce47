"""exod as an operating-system service: the systemd notify protocol and the health self-check
(daemon side), and everything `exoctl service` installs: platform paths, the launchd agent and
app bundle, the systemd user unit, and the plans that put them in place; with what it checks
first (the settings it bakes in, the exod that holds the home) and what `status` reports.
"""
