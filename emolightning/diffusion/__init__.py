"""Stable Diffusion pieces: the training-step math and a built-in tiny model."""
