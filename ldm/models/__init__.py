"""Model classes: the KL autoencoder and the latent diffusion model."""
