"""The tinker-jax server: front ends, service core, store."""
