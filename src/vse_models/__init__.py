"""Image-text matching models (baseline VSE, AVSE, MH-CVSE), data, evaluation and training.

Modules: `data` (SCAN precomp and patch-grid readers, vocabulary, batching, the synthetic data set),
`layers` (GPO, region encoder, BiGRU text encoder: shared by all models), `models` (registry + models),
`losses`, `evaluation` (retrieval metrics, COCO 5-fold, streamed similarities), `checkpoint`,
`train` (`vse-train`) and `evaluate` (`vse-eval`); search: `api` (`load` below), `topk` (streamed top-k),
`gallery` (index files), `ann` (FAISS candidates + rerank), `search` (`vse-search`).
"""


def load(run_or_checkpoint, device="cpu", which: str = "best"):
    """A trained run (or checkpoint folder) ready to encode, score and search: `api.Retriever`."""
    from .api import load as _load

    return _load(run_or_checkpoint, device=device, which=which)
