"""A Kubernetes cluster simulated on this machine: `make cluster-sim` and the tests that need one."""
