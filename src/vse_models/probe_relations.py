"""`python -m vse_models.probe_relations RUN [--split test]`: does a trained run tell relations apart?

On the synthetic world with relations (`n_relations` > 0), a caption and a near-duplicate of its image (same
family) that it does not describe make a pair; the model gets the pair right when it scores the caption's own
image strictly higher (a tie counts as wrong; chance 50%). Pairs come in two kinds:
- relation pairs: the other image shows both named objects as the caption states them, but relates them
  otherwise, so only the relation tells the two apart;
- object pairs: the other image misses a named object, its attribute or its place.
The two accuracies side by side say whether the model reads the relations as well as it reads the objects.
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Callable

import torch

from .checkpoint import load_checkpoint
from .data.synthetic import SyntheticConfig, describes, parse_caption, scenes_and_claims
from .evaluation import encode_split
from .models import DataInfo, slice_embeddings
from .train import data_root, load_split


def family_pair_accuracy(scenes, claims, family_size: int, captions_per_image: int,
                         family_scores: Callable[[int, int], torch.Tensor]) -> dict:
    """Accuracy on relation pairs and object pairs (module docstring). `family_scores(first, stop)` returns the
    (stop - first, k·(stop - first)) scores of the family's images against its captions."""
    k, counts = captions_per_image, {"relation": [0, 0], "object": [0, 0]}
    for first in range(0, len(scenes), family_size):
        stop = min(len(scenes), first + family_size)
        scores = family_scores(first, stop)
        for c in range(first * k, stop * k):
            own, (*named, relation) = c // k, claims[c]
            for other in range(first, stop):
                if other == own or describes(claims[c], scenes[other]):
                    continue
                kind = "relation" if relation >= 0 and describes((*named, -1), scenes[other]) else "object"
                counts[kind][0] += int(scores[own - first, c - first * k] > scores[other - first, c - first * k])
                counts[kind][1] += 1
    return {f"{kind}_pairs": total for kind, (_, total) in counts.items()} | {
        f"{kind}_accuracy": hits / total if total else float("nan") for kind, (hits, total) in counts.items()}


@torch.no_grad()
def probe(run: str, split_name: str = "test", which: str = "best") -> dict:
    model, vocab, config, _ = load_checkpoint(run, which, "cpu")
    model.eval()
    root = data_root(config["run"], verbose=False)
    params = json.loads((root / "params.json").read_text()) if (root / "params.json").is_file() else {}
    if not params.get("n_relations"):
        raise ValueError(f"{root}: not a synthetic data set with relations (params.json with n_relations > 0)")
    cfg = SyntheticConfig.from_dict({f.name: params[f.name] for f in fields(SyntheticConfig) if f.name in params})
    scenes, claims = scenes_and_claims(cfg, split_name)
    split = load_split(root, split_name, vocab, config["run"]["features"], DataInfo(**config["data_info"]))
    for c, text in enumerate(split.captions):  # the folder must hold what the generator draws again
        if parse_caption(text, cfg) != claims[c]:
            raise ValueError(f"{root / f'{split_name}_caps.txt'}:{c + 1}: {text!r} is not what this generator "
                             f"draws for it ({claims[c]}); was the data set written by another version?")
    img, txt = encode_split(model, split, 256, None, None)
    txt = model.complete_text_set(txt)
    k = split.captions_per_image

    def family_scores(first, stop):
        return model.similarity(slice_embeddings(img, first, stop), slice_embeddings(txt, first * k, stop * k))

    return family_pair_accuracy(scenes, claims, cfg.family_size, k, family_scores)


def main(argv: list[str] | None = None) -> int:
    from .probe_consensus import probe_arguments

    args = probe_arguments(argv, "probe_relations", __doc__, "run folder of a run trained on synthetic data with "
                           "relations", "test")
    out = probe(args.run, args.split, args.which)
    for kind in ("relation", "object"):
        print(f"{kind} pairs: {out[f'{kind}_pairs']:6d}   accuracy {100 * out[f'{kind}_accuracy']:.1f}%  (chance 50%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
