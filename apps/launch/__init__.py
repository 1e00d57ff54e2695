"""Process launching shared by the Procfile, the tests and the benchmarks: the bundled
Redis server and whole stacks of echo backends and balancers."""
