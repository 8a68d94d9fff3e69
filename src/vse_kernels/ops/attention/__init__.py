from .naive import multi_head_attention_reference
from .op import multi_head_attention, packed_self_attention

__all__ = ["multi_head_attention", "multi_head_attention_reference", "packed_self_attention"]
