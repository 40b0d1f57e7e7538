"""SHIFT (SPEC §6): debias a probe by ablating flagged SAE features, then retrain."""
