"""The echo backend and its fault profiles: the TEST backend the Procfile, the tests and
the benchmarks run behind the balancer. Nothing in the balancer imports it."""
