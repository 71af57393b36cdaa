"""Text encoders and the CLIPTokenizer built from open_clip's BPE file."""

import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTokenizer

from ldm.config import TextEncoderConfig
from ldm.errors import LdmError
from ldm.text_encoder import (
    OpenCLIPTextModel,
    build_open_clip_text_model,
    build_text_encoder,
    encode_text,
    hidden_size,
    open_clip_named_kwargs,
    tokenize,
)
from ldm.tokenizer import open_clip_tokenizer

TEXTS = [
    "a red circle",
    "A Cat in a SPACE suit",
    "naïve café, déjà-vu   spaces\tand tabs",
    "an astronaut riding a horse on the moon, " * 6,  # longer than the context: truncated
    "",
    "日本語のテキスト and emoji 🚀",
    "punctuation: (brackets) [more] 'quotes' & ampersands.",
]


@pytest.mark.parametrize("context_length", [16, 77])
def test_clip_tokenizer_from_open_clip_bpe_matches_open_clip(tmp_path, context_length):
    ours = open_clip_tokenizer(tmp_path, context_length)
    reference = open_clip.get_tokenizer("ViT-B-32", context_length=context_length)
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    assert len(json.loads((tmp_path / "vocab.json").read_text())) == 49408
    for text in TEXTS:
        assert tokenize(ours, [text])[0].tolist() == reference([text])[0].tolist(), text


def test_saved_tokenizer_reloads_with_its_length_and_pad(tmp_path):
    open_clip_tokenizer(tmp_path, 16)
    again = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert again.model_max_length == 16 and again.pad_token_id == 0
    assert tokenize(again, ["a blue square"]).shape == (1, 16)


def _tiny(**kw):
    torch.manual_seed(0)
    return OpenCLIPTextModel(width=32, heads=4, layers=3, context_length=8, **kw)


def test_last_layer_equals_open_clip_own_forward():
    model = _tiny()
    ids = torch.randint(0, 49408, (2, 8))
    tower = model.text
    x, mask = tower._embeds(ids)
    expected = tower.ln_final(tower.transformer(x, attn_mask=mask))
    torch.testing.assert_close(encode_text(model, ids), expected, rtol=0, atol=0)


def test_penultimate_layer_skips_the_last_block_then_applies_final_norm():
    model = _tiny(layer="penultimate")
    ids = torch.randint(0, 49408, (2, 8))
    tower = model.text
    x, mask = tower._embeds(ids)
    for block in tower.transformer.resblocks[:-1]:
        x = block(x, attn_mask=mask)
    torch.testing.assert_close(encode_text(model, ids), tower.ln_final(x), rtol=1e-6, atol=1e-6)


def test_causal_mask_keeps_earlier_tokens_independent_of_later_ones():
    model = _tiny()
    a = torch.tensor([[49406, 320, 736, 7117, 49407, 0, 0, 0]])
    b = a.clone()
    b[0, 3] = 2368  # change the 4th token only
    ha, hb = encode_text(model, a), encode_text(model, b)
    torch.testing.assert_close(ha[:, :3], hb[:, :3])
    assert not torch.allclose(ha[:, 3], hb[:, 3])


def test_save_and_load_round_trip(tmp_path):
    model = _tiny(layer="penultimate")
    model.save_pretrained(tmp_path)
    again = OpenCLIPTextModel.from_pretrained(tmp_path)
    ids = torch.randint(0, 49408, (3, 8))
    assert again.config.layer == "penultimate"
    assert torch.equal(encode_text(model, ids), encode_text(again, ids))


def test_same_config_same_random_tower():
    cfg = TextEncoderConfig(width=32, heads=4, layers=2, context_length=8, seed=5)
    a, b = build_open_clip_text_model(cfg), build_open_clip_text_model(cfg)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("prefix", ["", "text."])
def test_local_open_clip_weights_are_loaded(tmp_path, prefix):
    source = _tiny()
    # A whole-CLIP checkpoint keeps the tower at the top level; CustomTextCLIP under "text.".
    state = {prefix + k: v.clone() for k, v in source.text.state_dict().items()}
    state["visual.conv1.weight"] = torch.zeros(1)  # other towers' weights are ignored
    save_file(state, tmp_path / "clip.safetensors")
    cfg = TextEncoderConfig(width=32, heads=4, layers=3, context_length=8, seed=123, weights=str(tmp_path / "clip.safetensors"))
    loaded = build_open_clip_text_model(cfg)
    ids = torch.randint(0, 49408, (2, 8))
    assert torch.equal(encode_text(loaded, ids), encode_text(source, ids))


def test_missing_or_wrong_weights_are_clear_errors(tmp_path):
    cfg = TextEncoderConfig(width=32, heads=4, layers=3, context_length=8, weights=str(tmp_path / "nope.safetensors"))
    with pytest.raises(LdmError, match="not found"):
        build_open_clip_text_model(cfg)
    save_file({"something.else": torch.zeros(2)}, tmp_path / "other.safetensors")
    cfg.weights = str(tmp_path / "other.safetensors")
    with pytest.raises(LdmError, match="open_clip checkpoint"):
        build_open_clip_text_model(cfg)


def test_named_open_clip_configs():
    kw = open_clip_named_kwargs("ViT-H-14")
    assert (kw["width"], kw["layers"], kw["heads"]) == (1024, 24, 16)
    with pytest.raises(LdmError, match="unknown open_clip model"):
        open_clip_named_kwargs("ViT-Nope")


def test_build_text_encoder_open_clip_and_hf_folder(tmp_path):
    cfg = TextEncoderConfig(width=32, heads=4, layers=2, context_length=8)
    tokenizer, model = build_text_encoder(cfg, tmp_path / "tok")
    assert hidden_size(model) == 32
    assert encode_text(model, tokenize(tokenizer, ["a cat in a space suit"])).shape == (1, 8, 32)

    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    hf = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=8))
    hf.save_pretrained(tmp_path / "clip" / "text_encoder")
    tokenizer.save_pretrained(str(tmp_path / "clip" / "tokenizer"))
    hf_tok, hf_model = build_text_encoder(TextEncoderConfig(kind="hf_clip", path=str(tmp_path / "clip")), None)
    assert hidden_size(hf_model) == 32
    assert encode_text(hf_model, tokenize(hf_tok, ["a red circle"])).shape == (1, 8, 32)


def test_bad_text_encoder_configs():
    with pytest.raises(LdmError, match="kind"):
        build_text_encoder(TextEncoderConfig(kind="t5"), None)
    with pytest.raises(LdmError, match="local CLIP folder"):
        build_text_encoder(TextEncoderConfig(kind="hf_clip", path="/does/not/exist"), None)
    with pytest.raises(LdmError, match="layer"):
        OpenCLIPTextModel(layer="first")
