"""One run: settings, data, run directory, training loop, transfer, data parallelism."""
