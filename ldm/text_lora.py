"""A LoRA scale on the text encoder for one call (the `scale` of `cross_attention_kwargs`).

As `StableDiffusionPipeline.encode_prompt` does with the PEFT backend: scale the text
encoder's LoRA layers (LoRA: Hu et al. 2021, arXiv:2106.09685) before encoding, and scale
them back after. A text encoder without LoRA layers is left as it is.
"""

from contextlib import contextmanager


@contextmanager
def scaled_text_lora(text_encoder, lora_scale):
    if lora_scale is None or text_encoder is None:
        yield
        return
    from diffusers.utils import scale_lora_layers, unscale_lora_layers

    scale_lora_layers(text_encoder, lora_scale)
    try:
        yield
    finally:
        unscale_lora_layers(text_encoder, lora_scale)
