"""Image-text matching models (baseline VSE, AVSE, MH-CVSE), data, evaluation and training.

Modules: `data` (SCAN precomp and patch-grid readers, vocabulary, batching, the synthetic data set),
`layers` (GPO, region encoder, BiGRU text encoder: shared by all models), `models` (registry + models),
`losses`, `evaluation` (retrieval metrics, COCO 5-fold, streamed similarities), `checkpoint`,
`train` (`vse-train`) and `evaluate` (`vse-eval`).
"""
