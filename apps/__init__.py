"""The HTTP applications: the echo backend, the balancer's proxy and its admin listener."""
