"""The research core: masks, masked layers, cells, execution (tied, untied, equilibrium), backbones and presets. No files, no training loop."""
