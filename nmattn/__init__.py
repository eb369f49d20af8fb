"""nmattn: dynamic N:M fine-grained structured sparse attention for JAX.

In every group of `m` consecutive keys only the `n` largest attention scores
survive; softmax and `P V` run on the survivors (DFSS, arXiv 2203.00091).
"""

from nmattn import backends, layers, nnx, patterns, pruning, reference
from nmattn.attention import IMPLEMENTATIONS, nm_attention
from nmattn.backends import UnsupportedCallError
from nmattn.flax_attention import nm_dot_product_attention
from nmattn.importance import key_importance, nm_attention_with_importance
from nmattn.masking import nm_mask
from nmattn.patterns import DENSE, NM, SKIP, BlockPattern
from nmattn.reference import nm_attention_weights
from pallas_kernels.call import SUPPORTED_M

__version__ = "0.1.0"

__all__ = [
    "BlockPattern", "DENSE", "IMPLEMENTATIONS", "NM", "SKIP", "SUPPORTED_M",
    "UnsupportedCallError", "backends", "key_importance", "layers",
    "nm_attention", "nm_attention_weights", "nm_attention_with_importance",
    "nm_dot_product_attention",
    "nm_mask", "nnx", "patterns", "pruning", "reference",
]
