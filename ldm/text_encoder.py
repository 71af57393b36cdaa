"""Text encoders behind one small interface: token ids in, per-token hidden states out.

Two kinds:
- `OpenCLIPTextModel`: an open_clip text tower (a named open_clip config or a small
  custom one, optional local weights). It is a diffusers `ModelMixin`, so it saves and
  loads as a model-folder component like the VAE and the U-Net.
- `transformers.CLIPTextModel` from a local folder (what Stable Diffusion folders hold).

Both are paired with a `transformers.CLIPTokenizer` (for open_clip, built from the BPE
file open_clip ships; see `ldm.tokenizer`). `encode_text` hides their differences.
"""

from pathlib import Path
from typing import Optional

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from open_clip.model import CLIPTextCfg, _build_text_tower

from ldm.errors import LdmError

LAYERS = ("last", "penultimate")


class OpenCLIPTextModel(ModelMixin, ConfigMixin):
    """An open_clip text tower that returns the hidden states cross-attention reads.

    `layer="penultimate"` takes the output of the second-to-last block, then the final
    layer norm, as Stable Diffusion 2 does with OpenCLIP ViT-H.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        width: int = 64,
        heads: int = 4,
        layers: int = 2,
        context_length: int = 77,
        vocab_size: int = 49408,
        mlp_ratio: float = 4.0,
        quick_gelu: bool = False,
        embed_dim: Optional[int] = None,
        layer: str = "last",
    ):
        super().__init__()
        if layer not in LAYERS:
            raise LdmError(f"text_encoder.layer must be one of {LAYERS}, got '{layer}'")
        text_cfg = CLIPTextCfg(
            context_length=context_length, vocab_size=vocab_size, width=width, heads=heads,
            layers=layers, mlp_ratio=mlp_ratio,
        )
        self.text = _build_text_tower(embed_dim or width, text_cfg, quick_gelu=quick_gelu)

    @property
    def hidden_size(self) -> int:
        return self.config.width

    def forward(self, input_ids: torch.Tensor, attention_mask=None, clip_skip: Optional[int] = None, **_):
        """`clip_skip`: stop that many blocks earlier (diffusers' meaning: 1 is the block before the last used)."""
        # Blocks up to and including `last` (0-based); the final LayerNorm either way.
        last = self.config.layers - (2 if self.config.layer == "penultimate" else 1) - (clip_skip or 0)
        if last < 0:
            raise LdmError(f"clip_skip {clip_skip} skips every block of this {self.config.layers}-block text encoder")
        out = self.text.forward_intermediates(
            input_ids, indices=[last], stop_early=True, intermediates_only=True, output_fmt="NLC"
        )
        return (self.text.ln_final(out["text_intermediates"][0]),)


def enable_gradient_checkpointing(text_encoder) -> None:
    """Recompute the text tower's blocks in the backward pass (when it is trained)."""
    if isinstance(text_encoder, OpenCLIPTextModel):
        text_encoder.text.set_grad_checkpointing(True)
    else:
        text_encoder.gradient_checkpointing_enable()  # transformers' CLIPTextModel


def open_clip_named_kwargs(model_name: str) -> dict:
    """OpenCLIPTextModel arguments for a named open_clip config (ViT-H-14, ...)."""
    import open_clip

    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        names = ", ".join(open_clip.list_models()[:8])
        raise LdmError(f"unknown open_clip model '{model_name}' (open_clip knows e.g. {names}, ...)")
    text = cfg["text_cfg"]
    if text.get("hf_model_name"):
        raise LdmError(f"open_clip model '{model_name}' has a Hugging Face text tower; use kind=hf_clip")
    return dict(
        width=text.get("width", 512), heads=text.get("heads", 8), layers=text.get("layers", 12),
        context_length=text.get("context_length", 77), vocab_size=text.get("vocab_size", 49408),
        mlp_ratio=text.get("mlp_ratio", 4.0), quick_gelu=cfg.get("quick_gelu", False),
        embed_dim=cfg["embed_dim"],
    )


def load_open_clip_weights(model: OpenCLIPTextModel, path: str) -> None:
    """Load the text tower out of a local open_clip checkpoint (a whole CLIP or a tower)."""
    if not Path(path).is_file():
        raise LdmError(f"text encoder weights not found: {path} (set text_encoder.weights to a local file)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state)
    except Exception as e:  # noqa: BLE001 - not a weights file (or a pickle that would run code): one line
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise LdmError(f"text_encoder.weights: {path} is not a readable weights file ({type(e).__name__}: {reason}); "
                       "only plain tensors are loaded (safetensors, or a weights-only torch file)") from None
    wanted = model.text.state_dict().keys()
    # Whole CLIP models keep the text tower at the top level, CustomTextCLIP under "text.".
    tower = {}
    for key, value in state.items():
        key = key.removeprefix("module.").removeprefix("text.")
        if key in wanted:
            tower[key] = value
    missing = sorted(set(wanted) - set(tower))
    if missing:
        raise LdmError(f"{path} has no text tower weights for {missing[:3]}...: is it an open_clip checkpoint?")
    model.text.load_state_dict(tower)


def build_open_clip_text_model(cfg) -> OpenCLIPTextModel:
    """An OpenCLIPTextModel from a `TextEncoderConfig`."""
    kwargs = open_clip_named_kwargs(cfg.model_name) if cfg.model_name else dict(
        width=cfg.width, heads=cfg.heads, layers=cfg.layers,
        context_length=cfg.context_length, quick_gelu=cfg.quick_gelu,
    )
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)  # the same random tower for the same config
        model = OpenCLIPTextModel(layer=cfg.layer, **kwargs)
    if cfg.weights:
        load_open_clip_weights(model, cfg.weights)
    return model


def hidden_size(text_encoder) -> int:
    """Width of the hidden states that the U-Net's cross-attention reads."""
    return text_encoder.config.width if isinstance(text_encoder, OpenCLIPTextModel) else text_encoder.config.hidden_size


@torch.no_grad()
def tokenize(tokenizer, prompts, device=None) -> torch.Tensor:
    """Token ids padded to the tokenizer's full length, as Stable Diffusion pipelines do."""
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    ).input_ids
    return ids.to(device) if device is not None else ids


def encode_text(text_encoder, input_ids: torch.Tensor, clip_skip: Optional[int] = None) -> torch.Tensor:
    """Hidden states (batch, tokens, width) for cross-attention, from either kind.

    `clip_skip` (as in diffusers' pipelines): the hidden states `clip_skip` blocks before the
    usual output, through the final layer norm.
    """
    if not clip_skip:
        return text_encoder(input_ids)[0]
    if isinstance(text_encoder, OpenCLIPTextModel):
        return text_encoder(input_ids, clip_skip=clip_skip)[0]
    hidden = text_encoder(input_ids, output_hidden_states=True)[-1]
    if clip_skip + 1 > len(hidden) - 1:
        raise LdmError(f"clip_skip {clip_skip} skips every block of this {len(hidden) - 1}-block text encoder")
    # As StableDiffusionPipeline.encode_prompt: that block's output, then the final LayerNorm.
    # (transformers 5 flattened CLIPTextModel: the layer norm is no longer under .text_model.)
    final_layer_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
    return final_layer_norm(hidden[-(clip_skip + 1)])


def _hf_part(path: Path, part: str) -> str:
    # A Stable Diffusion folder holds text_encoder/ and tokenizer/; a bare CLIP folder holds both.
    return str(path / part) if (path / part).is_dir() else str(path)


def build_text_encoder(cfg, tokenizer_dir):
    """(tokenizer, text_encoder) from a `TextEncoderConfig`.

    open_clip: the tower from `cfg`, and a CLIPTokenizer written into `tokenizer_dir`.
    hf_clip: `transformers.CLIPTokenizer` and `CLIPTextModel` from the local `cfg.path`.
    """
    if cfg.kind == "open_clip":
        from ldm.tokenizer import open_clip_tokenizer

        model = build_open_clip_text_model(cfg)
        return open_clip_tokenizer(tokenizer_dir, model.config.context_length), model
    if cfg.kind == "hf_clip":
        from transformers import CLIPTextModel, CLIPTokenizer

        if not cfg.path or not Path(cfg.path).is_dir():
            raise LdmError(f"text_encoder.path must be a local CLIP folder for kind=hf_clip, got {cfg.path!r}")
        if cfg.layer != "last":
            raise LdmError("text_encoder.layer=penultimate is only supported for open_clip towers; use layer=last")
        path = Path(cfg.path)
        return CLIPTokenizer.from_pretrained(_hf_part(path, "tokenizer")), CLIPTextModel.from_pretrained(_hf_part(path, "text_encoder"))
    raise LdmError(f"text_encoder.kind must be 'open_clip' or 'hf_clip', got '{cfg.kind}'")
