"""Registry, contracts, config and factories shared by every task."""
