"""visionflow's own Lightning callbacks, registered in `CALLBACKS` by name."""

from visionflow.callbacks import progress, resizing, stopping  # noqa: F401  (registers callbacks)
