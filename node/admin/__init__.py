"""Administration: the queue (retry, drop), the studies overview and the models (registry, promotion)."""
