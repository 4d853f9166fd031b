"""Resources: the registry of checkpoints, LoRAs and embeddings, the verified file cache, the model catalog."""
