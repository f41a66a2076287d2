"""CompVis-compatible latent diffusion model package (drop-in files for a CompVis/stable-diffusion clone)."""
