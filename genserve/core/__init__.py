"""The floor everything stands on: settings, database, errors, logging, metrics and object storage.

Nothing here imports generation, resources, billing or training."""
