"""Safety guards: prompt audit, safety embeddings, likeness blocklist, image scan, audit log.

Plain Python: no Ray, no HTTP, and no imports from `genserve` or `training`.
"""
