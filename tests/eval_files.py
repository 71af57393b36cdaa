"""Random-weight stand-ins for the evaluation metrics' weight files, in the real files' formats.

The real files (torch-fidelity's Inception weights, an open_clip checkpoint, a
transformers CLIP folder) cannot be downloaded in tests; files with the same keys and
shapes exercise the same loading code.
"""

import json
import math

import torch

TEXT_LEN = 16


def write_inception_weights(path, seed: int = 0):
    """Inception-v3 with torch-fidelity's key layout (torchvision's names, 1008 classes, no AuxLogits),
    He-initialised convolutions so that random features are not vanishingly small."""
    from torchvision.models import inception_v3

    torch.manual_seed(seed)
    state = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008).state_dict()
    for value in state.values():
        if value.dim() == 4:
            value.normal_(0, math.sqrt(2.0 / value[0].numel()))
    torch.save(state, path)
    return path


TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": TEXT_LEN, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


def register_tiny_open_clip(folder, name: str = "ldm-test-tiny-clip") -> str:
    """Add a tiny open_clip model config under `name` (open_clip names models by their JSON file)."""
    import open_clip

    path = folder / f"{name}.json"
    path.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(path)
    return name


def write_open_clip_weights(folder, seed: int = 0):
    """(name, weights file, the model itself): a random tiny open_clip model saved as open_clip saves one."""
    import open_clip

    name = register_tiny_open_clip(folder)
    torch.manual_seed(seed)
    model = open_clip.create_model(name)
    path = folder / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), path)
    return name, path, model.eval()


def write_hf_clip_folder(folder, seed: int = 0):
    """A transformers CLIP folder (model, tokenizer with the real CLIP BPE, image processor), random weights."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from ldm.tokenizer import write_clip_tokenizer_files

    write_clip_tokenizer_files(folder)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=TEXT_LEN)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    torch.manual_seed(seed)
    tower = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    config = CLIPConfig(
        text_config=dict(**tower, vocab_size=49408, max_position_embeddings=TEXT_LEN),
        vision_config=dict(**tower, image_size=32, patch_size=8), projection_dim=16,
    )
    model = CLIPModel(config).eval()
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return folder, model, processor


def open_clip_as_transformers(model, config=TINY_OPEN_CLIP):
    """The same weights in a transformers CLIPModel (GELU, pre-LayerNorm ViT and text transformer, CLS and EOT
    pooling, both projections), so the open_clip CLIP score can be checked against torchmetrics' on one model."""
    from transformers import CLIPConfig, CLIPModel

    v, t, dim = config["vision_cfg"], config["text_cfg"], config["embed_dim"]
    hf = CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=t["width"], intermediate_size=4 * t["width"], num_attention_heads=t["heads"],
                         num_hidden_layers=t["layers"], vocab_size=t["vocab_size"], max_position_embeddings=t["context_length"],
                         hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=v["width"], intermediate_size=4 * v["width"], num_attention_heads=v["width"] // v["head_width"],
                           num_hidden_layers=v["layers"], image_size=v["image_size"], patch_size=v["patch_size"], hidden_act="gelu"),
        projection_dim=dim,
    ))
    src = model.state_dict()
    out = {"logit_scale": src["logit_scale"], "text_projection.weight": src["text_projection"].T,
           "visual_projection.weight": src["visual.proj"].T,
           "text_model.embeddings.token_embedding.weight": src["token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": src["positional_embedding"],
           "text_model.final_layer_norm.weight": src["ln_final.weight"], "text_model.final_layer_norm.bias": src["ln_final.bias"],
           "vision_model.embeddings.class_embedding": src["visual.class_embedding"],
           "vision_model.embeddings.patch_embedding.weight": src["visual.conv1.weight"],
           "vision_model.embeddings.position_embedding.weight": src["visual.positional_embedding"],
           "vision_model.pre_layrnorm.weight": src["visual.ln_pre.weight"], "vision_model.pre_layrnorm.bias": src["visual.ln_pre.bias"],
           "vision_model.post_layernorm.weight": src["visual.ln_post.weight"], "vision_model.post_layernorm.bias": src["visual.ln_post.bias"]}
    for ours, theirs, layers in (("transformer", "text_model", t["layers"]), ("visual.transformer", "vision_model", v["layers"])):
        for n in range(layers):
            a, b = f"{ours}.resblocks.{n}.", f"{theirs}.encoder.layers.{n}."
            for name, x in zip("qkv", src[a + "attn.in_proj_weight"].chunk(3)):
                out[b + f"self_attn.{name}_proj.weight"] = x
            for name, x in zip("qkv", src[a + "attn.in_proj_bias"].chunk(3)):
                out[b + f"self_attn.{name}_proj.bias"] = x
            pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                     "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
            for o, h in pairs.items():
                out[b + h + ".weight"], out[b + h + ".bias"] = src[a + o + ".weight"], src[a + o + ".bias"]
    missing, unexpected = hf.load_state_dict(out, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return hf.eval()
