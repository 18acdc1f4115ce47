"""Tests of the cluster: several exods (or discovery probes) in network namespaces."""
