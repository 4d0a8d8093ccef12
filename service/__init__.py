"""The Sceneprint REST service: enroll acoustic scenes from five clips, classify new audio against them."""
