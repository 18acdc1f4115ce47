"""The control plane: the gRPC API exoctl speaks over the Unix socket."""
