from .naive import hinge_triplet_loss_reference
from .op import hinge_triplet_loss

__all__ = ["hinge_triplet_loss", "hinge_triplet_loss_reference"]
