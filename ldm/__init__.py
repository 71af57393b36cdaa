"""ldm: latent-diffusion text-to-image training and sampling."""

__version__ = "0.1.0"


def __getattr__(name):
    # Import the pipeline lazily: `import ldm.data` should not pay for diffusers.
    if name == "LatentDiffusionPipeline":
        from ldm.pipeline import LatentDiffusionPipeline

        return LatentDiffusionPipeline
    if name == "LatentDiffusionImg2ImgPipeline":
        from ldm.pipeline_img2img import LatentDiffusionImg2ImgPipeline

        return LatentDiffusionImg2ImgPipeline
    if name == "LatentDiffusionInpaintPipeline":
        from ldm.pipeline_inpaint import LatentDiffusionInpaintPipeline

        return LatentDiffusionInpaintPipeline
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")


__all__ = ["LatentDiffusionPipeline", "LatentDiffusionImg2ImgPipeline", "LatentDiffusionInpaintPipeline", "__version__"]
