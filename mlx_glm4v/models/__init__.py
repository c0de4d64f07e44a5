"""What computes: configs, the vision tower, the text decoders, the glue model, M-RoPE positions,
caches."""
