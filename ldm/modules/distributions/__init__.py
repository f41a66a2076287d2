"""Probability distributions used by the autoencoder and the diffusion model."""
