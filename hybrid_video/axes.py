"""Logical axis names, defined once. Config maps them to mesh axes (hybrid_video/sharding.py).

Parameters and activations use the same names; `EMBED` of parameters is the FSDP axis, while
activations keep the width whole and shard the batch (see `ACTIVATION` below).
"""

BATCH = "batch"                # examples
FRAMES = "frames"              # latent frames (per-frame modulation)
TOKENS = "tokens"              # video tokens of a chunk or clip
CACHE_TOKENS = "cache_tokens"  # tokens held in a softmax layer's K/V cache
EMBED = "embed"                # model width of parameters
HEADS = "heads"                # attention heads (also heads x head_dim when flattened)
HEAD_DIM = "head_dim"
MLP = "mlp"                    # MLP hidden width
STATE_K = "state_k"            # gated-delta state, key side
STATE_V = "state_v"            # gated-delta state, value side
COND = "cond"                  # conditioning tokens

# Activations between blocks: [B, T, dim] with the width replicated.
ACTIVATION = (BATCH, TOKENS, None)
GDN_STATE = (BATCH, HEADS, STATE_K, STATE_V)
KV_CACHE = (BATCH, CACHE_TOKENS, HEADS, HEAD_DIM)
VIDEO = (BATCH, None, None, None, None)
