"""CLIP score (Hessel et al. 2021) of images against their prompts, from a local CLIP.

    CLIP score = max(100 * mean_i cos(E_image_i, E_text_i), 0)

exactly as torchmetrics' `CLIPScore` computes it (the per-pair cosines are averaged,
then the mean is clamped at 0). Two kinds of local CLIP:

- a transformers CLIP folder: torchmetrics' `CLIPScore` itself, given the model and
  processor loaded from the folder (never a hub name);
- an open_clip model name plus its weights file: torchmetrics takes transformers models
  only, so the formula above is written out on open_clip's `encode_image` /
  `encode_text`, with open_clip's own preprocessing and tokenizer.
"""

import pickle
from typing import Callable, List, Optional

import torch

from ldm.errors import LdmError
from ldm.eval.weights import WHERE_HF_CLIP, WHERE_OPEN_CLIP, require_file, require_folder


def clip_cosines(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """100 * cos(image_i, text_i) per pair, unclamped (torchmetrics' per-pair score)."""
    a = image_features / image_features.norm(p=2, dim=-1, keepdim=True)
    b = text_features / text_features.norm(p=2, dim=-1, keepdim=True)
    return 100 * (a * b).sum(dim=-1)


def aggregate(scores: torch.Tensor) -> float:
    """torchmetrics' compute(): the mean per-pair score, clamped at 0."""
    return max(float(scores.double().mean()), 0.0)


class FormulaClipScore:
    """CLIP score from two encoders (images as uint8 (N, 3, H, W) -> features; prompts -> features)."""

    def __init__(self, encode_images: Callable, encode_texts: Callable, batch_size: int = 32):
        self.encode_images, self.encode_texts, self.batch_size = encode_images, encode_texts, batch_size

    @torch.no_grad()
    def per_pair(self, images: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        if len(images) != len(prompts):
            raise LdmError(f"CLIP score needs one prompt per image, got {len(images)} images and {len(prompts)} prompts")
        out = []
        for i in range(0, len(images), self.batch_size):
            sl = slice(i, i + self.batch_size)
            out.append(clip_cosines(self.encode_images(images[sl]).float(), self.encode_texts(prompts[sl]).float()).cpu())
        return torch.cat(out)

    def __call__(self, images: torch.Tensor, prompts: List[str]) -> float:
        return aggregate(self.per_pair(images, prompts))


class ProjectedFeatures(torch.nn.Module):
    """A transformers CLIPModel whose get_*_features return the projected features as a tensor.

    transformers 5 returns a model output (the features in `pooler_output`) where 4.x, and
    torchmetrics' CLIPScore, expect the tensor; this adapter gives torchmetrics the tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config  # torchmetrics reads text_config.max_position_embeddings

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return _features(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return _features(self.model.get_text_features(*args, **kwargs))


class TorchmetricsClipScore:
    """torchmetrics' CLIPScore on a transformers CLIPModel + CLIPProcessor."""

    def __init__(self, model, processor, batch_size: int = 32):
        from torchmetrics.multimodal.clip_score import CLIPScore

        adapted = ProjectedFeatures(model)
        self.metric = CLIPScore(model_name_or_path=lambda: (adapted, processor))
        self.batch_size = batch_size
        self.device = next(model.parameters()).device  # torchmetrics runs the model where the images are

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: List[str]) -> float:
        if len(images) != len(prompts):
            raise LdmError(f"CLIP score needs one prompt per image, got {len(images)} images and {len(prompts)} prompts")
        self.metric.reset()
        for i in range(0, len(images), self.batch_size):
            self.metric.update(images[i : i + self.batch_size].to(self.device), list(prompts[i : i + self.batch_size]))
        return float(self.metric.compute())


def hf_encoders(model, processor, device="cpu"):
    """(encode_images, encode_texts) of a transformers CLIP, preprocessed as torchmetrics does it."""
    model = model.to(device).eval()

    def encode_images(images):
        pixels = processor(images=[im.cpu() for im in images], return_tensors="pt", padding=True)["pixel_values"]
        return _features(model.get_image_features(pixels.to(device)))

    def encode_texts(prompts):
        tokens = processor(text=list(prompts), return_tensors="pt", padding=True)
        return _features(model.get_text_features(tokens["input_ids"].to(device), tokens["attention_mask"].to(device)))

    return encode_images, encode_texts


def _features(out):
    """transformers 5 returns a model output where 4.x returned the projected features."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def open_clip_encoders(model, preprocess, tokenizer, device="cpu"):
    """(encode_images, encode_texts) of an open_clip model, with its own preprocessing and tokenizer."""
    from PIL import Image

    model = model.to(device).eval()

    def encode_images(images):
        pil = [Image.fromarray(im.permute(1, 2, 0).cpu().numpy()) for im in images]
        return model.encode_image(torch.stack([preprocess(p) for p in pil]).to(device))

    def encode_texts(prompts):
        return model.encode_text(tokenizer(list(prompts)).to(device))

    return encode_images, encode_texts


CLI_SETTINGS = {"name": "--clip-model", "weights": "--clip-weights", "folder": "--clip-folder"}


def load_hf_clip(folder, setting: str = CLI_SETTINGS["folder"], device="cpu") -> TorchmetricsClipScore:
    from transformers import CLIPModel, CLIPProcessor

    folder = require_folder(folder, setting, "CLIP score", WHERE_HF_CLIP)
    try:
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True)
        processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - also a damaged weights file (SafetensorError), a refused pickle
        raise LdmError(f"{setting}: cannot load a transformers CLIP from {folder} ({str(e).splitlines()[0][:160]}); {WHERE_HF_CLIP}") from None
    return TorchmetricsClipScore(model.to(device).eval(), processor)


def load_open_clip(name: str, weights, setting: str = CLI_SETTINGS["weights"], device="cpu",
                   name_setting: str = CLI_SETTINGS["name"]) -> FormulaClipScore:
    import open_clip

    path = require_file(weights, setting, f"CLIP score with open_clip model {name}", WHERE_OPEN_CLIP)
    if name not in open_clip.list_models():
        raise LdmError(f"{name_setting}: open_clip has no model named '{name}' (e.g. ViT-B-32, ViT-H-14; see open_clip.list_models())")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(path), device=device)
    except (RuntimeError, KeyError, ValueError, pickle.UnpicklingError) as e:  # a pickle that would run code: refused
        raise LdmError(f"{setting}: {path} does not hold open_clip {name} weights ({str(e).splitlines()[0][:160]})") from None
    tokenizer = open_clip.get_tokenizer(name)
    return FormulaClipScore(*open_clip_encoders(model, preprocess, tokenizer, device))


def load_clip(open_clip_name: Optional[str] = None, open_clip_weights: Optional[str] = None,
              hf_folder: Optional[str] = None, device="cpu", settings: Optional[dict] = None):
    """A CLIP scorer from one local CLIP: `open_clip_name` + `open_clip_weights`, or `hf_folder`.

    `settings` names the three options in errors ({"name", "weights", "folder"}): the command-line
    flags by default; a training config passes its keys."""
    names = {**CLI_SETTINGS, **(settings or {})}
    if hf_folder is not None and (open_clip_name or open_clip_weights):
        raise LdmError(f"give one CLIP: {names['folder']} (transformers) or {names['name']} with {names['weights']} (open_clip), not both")
    if hf_folder is not None:
        return load_hf_clip(hf_folder, names["folder"], device=device)
    if open_clip_name is None:
        raise LdmError(f"CLIP score needs a local CLIP: {names['name']} NAME {names['weights']} FILE ({WHERE_OPEN_CLIP}) "
                       f"or {names['folder']} DIR ({WHERE_HF_CLIP})")
    return load_open_clip(open_clip_name, open_clip_weights, names["weights"], device=device, name_setting=names["name"])
