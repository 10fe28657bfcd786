"""Near-duplicate removal with the paper's autoencoder semantic hash (see the dedup issue)."""
