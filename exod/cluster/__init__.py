"""The cluster: membership, peers, discovery, placement."""
