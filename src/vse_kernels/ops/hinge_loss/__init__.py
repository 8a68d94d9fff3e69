from .naive import hinge_triplet_loss_embeddings_reference, hinge_triplet_loss_reference
from .op import hinge_triplet_loss, hinge_triplet_loss_embeddings

__all__ = ["hinge_triplet_loss", "hinge_triplet_loss_embeddings", "hinge_triplet_loss_reference",
           "hinge_triplet_loss_embeddings_reference"]
