"""vae_attacks: adversarial attacks on VAEs and CNN classifiers, in JAX."""
