"""Registry, contracts and config shared by every task; imports nothing else of visionflow."""
