"""The generation worker: the engine without Ray (`core`), its Serve deployment, its errors and wire types."""
