"""The latent family: :mod:`~kvslim.cache.methods.latent.latent` (low-rank projected keys and values) and the
calibration of its per-layer bases on sample text (:mod:`~kvslim.cache.methods.latent.calibration`).
"""
