"""Pipeline definitions. `make compile` writes their compiled YAML beside them."""
