"""Self-supervised pre-training (SimCLR, MoCo v2): losses as pure functions, batched views,
one train loop for both methods."""
