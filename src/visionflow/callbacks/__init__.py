"""visionflow's own Lightning callbacks, registered in `CALLBACKS` by name."""

from visionflow.callbacks import progress, resizing, stopping, telemetry  # noqa: F401  (registers callbacks)
