"""Data: SCAN precomputed-feature readers, patch grids, vocabulary, batching, the synthetic data set."""

from .precomp import Batch, Split, pad_tokens, read_captions, sequential_batches, shuffled_batches
from .synthetic import SyntheticConfig, default_cache_dir, ensure_synthetic, generate
from .vocab import Vocabulary, tokenize

__all__ = ["Batch", "Split", "SyntheticConfig", "Vocabulary", "default_cache_dir", "ensure_synthetic",
           "generate", "pad_tokens", "read_captions", "sequential_batches", "shuffled_batches", "tokenize"]
