"""Tools around the node: the benchmark, the demo and offline scoring of files."""
