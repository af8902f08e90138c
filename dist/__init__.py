"""The distributed runtime: rank environment, topology, process groups, communication, checkpoints."""
