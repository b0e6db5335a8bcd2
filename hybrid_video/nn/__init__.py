"""Pure Flax NNX modules: embeddings, attention, the ARL2 hybrid layer, LoRA, blocks, the DiT."""
