"""Analysis of trained models: layer-to-layer CKA, mask statistics, state dynamics."""
