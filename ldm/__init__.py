"""ldm: latent-diffusion text-to-image training and sampling."""

__version__ = "0.1.0"


def __getattr__(name):
    # Import the pipeline lazily: `import ldm.data` should not pay for diffusers.
    if name == "LatentDiffusionPipeline":
        from ldm.pipeline import LatentDiffusionPipeline

        return LatentDiffusionPipeline
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")


__all__ = ["LatentDiffusionPipeline", "__version__"]
