"""Model builders, registered in `visionflow.core.registry.MODELS`."""

from visionflow.vision.models import classification, fast  # noqa: F401  (registers models)
