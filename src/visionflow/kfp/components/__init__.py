"""KFP components, one per step. Each body imports visionflow and calls one step function.

The image tags come from the package (`visionflow.CPU_IMAGE`, `visionflow.TRAIN_IMAGE`): they are
tied to its version, so a compiled pipeline runs the code it came from.
"""

from visionflow import CPU_IMAGE as IMAGE
from visionflow import TRAIN_IMAGE

__all__ = ["IMAGE", "TRAIN_IMAGE"]
