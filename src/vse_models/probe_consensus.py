"""`python -m vse_models.probe_consensus RUN [--split dev]`: what the consensus level of a trained `mh-cvse`
run contributes (the measurements behind the README's diagnosis of MH-CVSE on the synthetic data).

Prints
- the concept graph: how many concept pairs it links (both directions counted), the mean weight of the
  self-loop and of the neighbours in a row of Â, and its strongest links by name;
- how spread the concept embeddings Z are: mean cosine between two different concepts, trained and for a
  freshly initialised GCN on the same graph (near 1: the consensus level has collapsed);
- how well the image-side concept distribution s_v ranks the image's concepts: mAP against the union of
  the concepts its captions mention, next to a linear classifier trained on the same training images;
- the rsum of each score on the split: instance, consensus, the model's (fused), −KL(s_t ‖ s_v), with
  test-time label completion, and a bag-of-concepts oracle (a caption scores the fraction of its concepts
  that the candidate image's captions mention: it reads the split's own captions, an optimistic bound for
  what concept labels alone can tell).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import load_checkpoint
from .cvse_parts import concept_data
from .evaluation import encode_split, metrics_from_ranks, ranks
from .models import DataInfo
from .train import data_root, load_split


def _mean_offdiag(m: torch.Tensor) -> float:
    n = m.size(0)
    return float((m.sum() - m.diagonal().sum()) / max(1, n * n - n))


def mean_average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over rows of the average precision of ranking the columns by `scores` against 0/1 `labels`
    (rows without a positive are skipped)."""
    order = scores.argsort(dim=1, descending=True)
    hits = labels.gather(1, order).float()
    precision = hits.cumsum(1) / torch.arange(1, hits.size(1) + 1, dtype=hits.dtype)
    positives = hits.sum(1)
    keep = positives > 0
    return float(((precision * hits).sum(1)[keep] / positives[keep]).mean())


def pooled_features(split) -> torch.Tensor:
    """Mean and max over each image's raw region (or patch) features, (n_images, 2F); read in chunks, so a
    large memory-mapped feature file is never loaded whole."""
    chunks = []
    for start in range(0, len(split.images), 1024):
        x = torch.from_numpy(np.array(split.images[start:start + 1024], dtype=np.float32)).flatten(1, -2)
        chunks.append(torch.cat([x.mean(1), x.amax(1)], dim=1))
    return torch.cat(chunks)


def linear_probe_map(train, train_labels: torch.Tensor, split, labels: torch.Tensor, steps: int = 300) -> float:
    """mAP on `split` (image concept `labels`) of a linear multi-label classifier from `pooled_features` to
    the concepts, trained on `train` with `train_labels` (binary cross-entropy, full-batch Adam, lr 1e-2,
    seed 0): how well the concepts can be told from the same training images without the retrieval model."""
    x_train, x_eval = pooled_features(train), pooled_features(split)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_eval = (x_train - mean) / std, (x_eval - mean) / std
    y_train = train_labels.float()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        classifier = torch.nn.Linear(x_train.size(1), y_train.size(1))
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-2, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.binary_cross_entropy_with_logits(classifier(x_train), y_train)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return mean_average_precision(classifier(x_eval), labels)


@torch.no_grad()
def probe(run: str, split_name: str = "dev", which: str = "best", completion_k: int = 4) -> dict:
    model, vocab, config, _ = load_checkpoint(run, which, "cpu")
    if config["run"]["model"] not in ("mh-cvse", "cvse"):
        raise ValueError(f"{run}: an mh-cvse or cvse run is needed, this one trained {config['run']['model']!r}")
    model.eval()
    root = data_root(config["run"])
    split = load_split(root, split_name, vocab, config["run"]["features"], DataInfo(**config["data_info"]))
    k = split.captions_per_image
    img, txt = encode_split(model, split, 256, None, None)
    v_inst, v_cons, _, s_v = img
    t_inst, t_cons, _, s_t, _, labels = txt
    out = {}
    adj = model.adjacency
    out["graph_self_weight"] = float(adj.diagonal().mean())
    out["graph_neighbour_mass"] = float((adj.sum(1) - adj.diagonal()).mean())
    links = adj - torch.diag(adj.diagonal())
    out["graph_links"] = int((links > 0).sum())
    names = {int(c): vocab.idx2word[w] for w, c in enumerate(model.word_to_concept.tolist()) if c >= 0}
    pairs = torch.triu(torch.maximum(links, links.t()), diagonal=1)  # a pair once, by its stronger direction
    order = pairs.flatten().argsort(descending=True)[: min(8, int((pairs > 0).sum()))]
    out["graph_strongest_links"] = ", ".join(f"{names.get(int(i) // adj.size(1), '?')}-{names.get(int(i) % adj.size(1), '?')}"
                                             for i in order)
    z = model.concept_embeddings()
    out["concept_cos_trained"] = _mean_offdiag(z @ z.t())
    with torch.random.fork_rng():  # a fresh GCN and concept vectors initialised as in the model, seed 0
        torch.manual_seed(0)
        fresh = type(model.gcn)(model.concept_emb.size(1), model.options["gcn_hidden"], model.options["embed_size"])
        z0 = fresh(torch.empty_like(model.concept_emb).uniform_(-0.1, 0.1), adj)
    out["concept_cos_init"] = _mean_offdiag(z0 @ z0.t())
    image_labels = labels.view(-1, k, labels.size(1)).amax(1)
    out["image_concepts_map"] = mean_average_precision(s_v, image_labels)
    train = load_split(root, "train", vocab, config["run"]["features"])
    train_labels = concept_data(train.tokens, vocab.idx2word, model.options["num_concepts"], train.captions_per_image,
                                train.n_images, cache_dir=root)["image_labels"]  # as training saw them
    out["linear_probe_map"] = linear_probe_map(train, train_labels, split, image_labels)

    def rsum(score):
        return round(metrics_from_ranks(*ranks(score, k))["rsum"], 1)

    neg_kl = s_v.clamp_min(1e-12).log() @ s_t.t() - (s_t * s_t.clamp_min(1e-12).log()).sum(1)[None]
    gen = torch.Generator().manual_seed(0)
    bag = image_labels.float() @ labels.t() / labels.sum(1).clamp_min(1)[None]
    out["rsum"] = {
        "instance": rsum(v_inst @ t_inst.t()),
        "consensus": rsum(v_cons @ t_cons.t()),
        "model (fused)": rsum(model.similarity(img, model.complete_text_set(txt))),  # as the run evaluates
        "-KL(s_t||s_v)": rsum(neg_kl),
        f"model, label completion k={completion_k}": rsum(model.similarity(img, model.complete_text_labels(txt, completion_k))),
        "bag-of-concepts oracle": rsum(bag + 1e-4 * torch.rand(bag.shape, generator=gen)),  # random tie-break
    }
    return out


def probe_arguments(argv: list[str] | None, module: str, doc: str, run_help: str, split: str) -> argparse.Namespace:
    """The command line of a `python -m vse_models.probe_*` module: RUN [--split] [--which]."""
    p = argparse.ArgumentParser(prog=f"python -m vse_models.{module}", description=doc.split("\n\n")[0])
    p.add_argument("run", help=run_help)
    p.add_argument("--split", default=split)
    p.add_argument("--which", choices=["best", "last"], default="best")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = probe_arguments(argv, "probe_consensus", __doc__, "run folder of an mh-cvse or cvse training run", "dev")
    out = probe(args.run, args.split, args.which)
    scores = out.pop("rsum")
    for name, value in out.items():
        print(f"{name:28s} {value if isinstance(value, (int, str)) else f'{value:.3f}'}")
    for name, value in scores.items():
        print(f"rsum {name:40s} {value:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
