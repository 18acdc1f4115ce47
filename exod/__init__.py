"""exod: run large language models as an operating-system service."""

__version__ = "0.1.0"
# The control API's version; exoctl warns when the daemon reports another one.
API_VERSION = "1"
# The runner pipe's version; the handshake refuses a runner that speaks another one.
RUNNER_PROTOCOL_VERSION = 1
