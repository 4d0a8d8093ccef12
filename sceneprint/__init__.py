"""Sceneprint: teach a machine a new acoustic scene from a handful of clips.

The core package holds everything that both the service and the training pipeline use, so that
audio is decoded, featurised and embedded in exactly one way: ``audio`` (decoding), ``frontend``
(log-mel features), ``cpmobile`` (the student network), ``encoder`` (front-end + network + sliding
windows), ``bundle`` (the on-disk model format) and ``prototypes`` (scene prototype math).
"""

__version__ = "0.1.0"
