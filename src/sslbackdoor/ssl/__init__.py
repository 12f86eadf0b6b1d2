"""Self-supervised pre-training (SimCLR): losses as pure functions, batched views, train loop."""
