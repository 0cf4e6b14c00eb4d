"""The clinician's web application: upload, prediction with heatmap, feedback, audit, users.

Depends on inference code only (lungcad.inference.predictor), never on training code.
Install with the `web` extra: `pip install 'lungcad[web]'`.
"""
