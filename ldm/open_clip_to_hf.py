"""Convert an open_clip text tower (`OpenCLIPTextModel`) into a `transformers.CLIPTextModel`.

Stable Diffusion tools load the text encoder as a CLIPTextModel and use its
`last_hidden_state` (the last block's output after `final_layer_norm`). The two are the
same pre-LayerNorm transformer under different names, so the conversion is a renaming:

    open_clip                                     transformers CLIPTextModel
    token_embedding.weight                        embeddings.token_embedding.weight
    positional_embedding                          embeddings.position_embedding.weight
    transformer.resblocks.N.attn.in_proj_*        encoder.layers.N.self_attn.{q,k,v}_proj.*
    transformer.resblocks.N.attn.out_proj.*       encoder.layers.N.self_attn.out_proj.*
    transformer.resblocks.N.ln_1 / ln_2           encoder.layers.N.layer_norm1 / layer_norm2
    transformer.resblocks.N.mlp.c_fc / c_proj     encoder.layers.N.mlp.fc1 / fc2
    ln_final                                      final_layer_norm

Masks agree: open_clip's text tower uses a causal mask and no padding mask; CLIPTextModel
always applies the causal mask, and Stable Diffusion pipelines pass no attention_mask
(unless the config sets `use_attention_mask`, which we never do), so the padding tokens
("!" = id 0, as open_clip pads) are attended to in both.

`layer="penultimate"` (SD 2) reads the second-to-last block, then `ln_final`: the HF model
gets one block fewer, so its last_hidden_state is exactly that, as SD 2's own conversion
(diffusers `convert_open_clip_checkpoint`) does.
"""

import torch
from open_clip.transformer import QuickGELU
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.errors import LdmError
from ldm.text_encoder import OpenCLIPTextModel

# Per block: open_clip name -> CLIPTextModel name (each with .weight and .bias).
BLOCK_RENAMES = {
    "attn.out_proj": "self_attn.out_proj",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
# open_clip entries with no CLIPTextModel counterpart: the pooled projection (SD reads the
# per-token states, not the pooled one) and the causal mask (CLIPTextModel builds its own).
UNUSED = ("text_projection", "text_projection.weight", "text_projection.bias", "attn_mask")
# CLIP's BPE vocabulary (open_clip's and the tokenizer we save): <|startoftext|>, <|endoftext|>, "!".
CLIP_BOS, CLIP_EOS, OPEN_CLIP_PAD_ID = 49406, 49407, 0


def hidden_act(tower) -> str:
    """transformers' name for the tower's MLP activation (both GELUs are exact in both libraries)."""
    act = tower.transformer.resblocks[0].mlp.gelu
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    raise LdmError(f"cannot convert an open_clip text tower with activation {act!r}: only GELU and QuickGELU have CLIPTextModel equivalents")


def check_convertible(tower) -> None:
    """Refuse open_clip features CLIPTextModel lacks, rather than export a model that computes something else."""
    block = tower.transformer.resblocks[0]
    if tower.cls_emb is not None:
        raise LdmError("cannot convert an open_clip text tower with a CLS embedding (embed_cls) to CLIPTextModel")
    if tower.attn_mask is None:
        raise LdmError("cannot convert a bidirectional open_clip text tower (no_causal_mask): CLIPTextModel is causal")
    if not isinstance(block.ls_1, nn.Identity) or not isinstance(block.ls_2, nn.Identity):
        raise LdmError("cannot convert an open_clip text tower with LayerScale (ls_init_value) to CLIPTextModel")
    if not isinstance(block.attn, nn.MultiheadAttention):
        raise LdmError(f"cannot convert an open_clip text tower with {type(block.attn).__name__} attention to CLIPTextModel")


def hf_clip_config(model: OpenCLIPTextModel, tokenizer=None) -> CLIPTextConfig:
    """The CLIPTextConfig of the converted model (one block fewer for layer="penultimate")."""
    cfg, tower = model.config, model.text
    block = tower.transformer.resblocks[0]
    ids = dict(bos_token_id=CLIP_BOS, eos_token_id=CLIP_EOS, pad_token_id=OPEN_CLIP_PAD_ID)
    if tokenizer is not None:
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        intermediate_size=block.mlp.c_fc.out_features,  # int(width * mlp_ratio), as open_clip rounds it
        num_attention_heads=cfg.heads,
        num_hidden_layers=cfg.layers - (1 if cfg.layer == "penultimate" else 0),
        max_position_embeddings=cfg.context_length,
        hidden_act=hidden_act(tower),
        layer_norm_eps=tower.ln_final.eps,
        projection_dim=cfg.embed_dim or cfg.width,
        **ids,
    )


def hf_clip_state_dict(model: OpenCLIPTextModel, num_layers: int) -> dict:
    """The tower's weights under CLIPTextModel names (relative to its text transformer)."""
    src = model.text.state_dict()
    out = {
        "embeddings.token_embedding.weight": src.pop("token_embedding.weight"),
        "embeddings.position_embedding.weight": src.pop("positional_embedding"),
        "final_layer_norm.weight": src.pop("ln_final.weight"),
        "final_layer_norm.bias": src.pop("ln_final.bias"),
    }
    for i in range(model.config.layers):
        ours, theirs = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        names = {f"{ours}attn.in_proj_weight", f"{ours}attn.in_proj_bias"}
        names |= {f"{ours}{a}.{p}" for a in BLOCK_RENAMES for p in ("weight", "bias")}
        block = {name: src.pop(name) for name in names if name in src}
        if i >= num_layers:
            continue  # the block that layer="penultimate" never runs
        # nn.MultiheadAttention packs q, k, v (in that order) into one projection.
        for kind in ("weight", "bias"):
            for part, value in zip("qkv", block[f"{ours}attn.in_proj_{kind}"].chunk(3)):
                out[f"{theirs}self_attn.{part}_proj.{kind}"] = value
        for a, b in BLOCK_RENAMES.items():
            for kind in ("weight", "bias"):
                out[f"{theirs}{b}.{kind}"] = block[f"{ours}{a}.{kind}"]
    leftover = sorted(k for k in src if k not in UNUSED)
    if leftover:
        raise LdmError(f"cannot convert open_clip text tower weights {leftover[:3]}: CLIPTextModel has no place for them")
    return out


@torch.no_grad()
def open_clip_to_hf(model: OpenCLIPTextModel, tokenizer=None) -> CLIPTextModel:
    """A CLIPTextModel whose last_hidden_state equals `model(input_ids)[0]`, in the model's dtype."""
    check_convertible(model.text)
    config = hf_clip_config(model, tokenizer)
    hf = CLIPTextModel(config)
    # transformers < 5 nests the transformer in `.text_model`; 5 puts it at the top level.
    core = getattr(hf, "text_model", hf)
    core.load_state_dict(hf_clip_state_dict(model, config.num_hidden_layers), strict=True)
    return hf.to(model.dtype).eval()
