"""Model builders, registered in `visionflow.core.registry.MODELS`."""

from visionflow.vision.models import (  # noqa: F401  (registers models)
    classification,
    detection,
    fast,
    segmentation,
)
