"""sdbot: Stable Diffusion on your own GPU, in your Discord server."""

__version__ = "0.1.0"
