"""Encoder bundles shipped with Sceneprint (the bundled default lives in sceneprint-default/)."""
