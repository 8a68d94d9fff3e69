"""Errors that stop a run or an evaluation instead of producing a number that looks right and is not.
Both are ValueErrors, so the CLIs report them in one line."""


class NonFiniteError(ValueError):
    """NaN or infinite values in features, a loss, gradients, weights, embeddings or scores."""


class CheckpointError(ValueError):
    """A checkpoint or gallery index file that is missing, truncated, corrupt or does not fit the model; names the file."""
