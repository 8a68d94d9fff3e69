"""Image-text matching models (baseline VSE, AVSE, MH-CVSE), data, evaluation and training."""
