"""The balancer: the reverse proxy, its admin listener, health checks and metrics."""
