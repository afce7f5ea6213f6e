"""Running the method: the typed run configuration, the sampler that streams stages into a store,
devices, processes (launcher, distributed topology), pre-flight checks, stopping and progress."""
