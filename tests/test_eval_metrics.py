"""FID, KID and CLIP score: the formulas against float64 write-outs, and the loading of local weight files
(random-weight files the tests write, in the real files' layouts)."""

import itertools
import pickle

import numpy as np
import pytest
import scipy.linalg
import torch

from ldm.errors import LdmError
from ldm.eval.clip_score import FormulaClipScore, hf_encoders, load_clip, load_hf_clip, load_open_clip
from ldm.eval.fid_kid import InceptionMetrics, PassThrough, from_model_range
from ldm.eval.inception import load_inception
from ldm.eval.weights import INCEPTION_FILE

from eval_files import write_hf_clip_folder, write_inception_weights, write_open_clip_weights


def with_moments(z: np.ndarray, mu: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Rows whose sample mean is exactly `mu` and sample covariance (n - 1) exactly `cov`."""
    z = z - z.mean(0)
    whiten = np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False)))
    return mu + z @ whiten.T @ np.linalg.cholesky(cov).T


def frechet_reference(mu1, s1, mu2, s2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64 (Dowson & Landau 1982)."""
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def passthrough_metrics(d, **kwargs):
    return InceptionMetrics(PassThrough(d), d, **kwargs)


def test_fid_is_the_frechet_distance_of_the_fitted_gaussians():
    rng = np.random.default_rng(0)
    d, n = 6, 50
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    x, y = with_moments(rng.normal(size=(n, d)), mu1, s1), with_moments(rng.normal(size=(n + 7, d)), mu2, s2)
    metrics = passthrough_metrics(d)
    for chunk in np.array_split(x, 3):  # batches add up
        metrics.update(torch.from_numpy(chunk), real=True)
    metrics.update(torch.from_numpy(y), real=False)
    expected = frechet_reference(mu1, s1, mu2, s2)
    assert expected > 1
    assert metrics.compute()["fid"] == pytest.approx(expected, rel=1e-9)


def test_fid_of_diagonal_gaussians_in_closed_form():
    """Diagonal covariances: Tr(...) = sum (sqrt a_i - sqrt b_i)^2, no matrix square root needed."""
    rng = np.random.default_rng(1)
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, -1.0])
    x, y = with_moments(rng.normal(size=(40, 3)), mu1, np.diag(a)), with_moments(rng.normal(size=(30, 3)), mu2, np.diag(b))
    metrics = passthrough_metrics(3)
    metrics.update(torch.from_numpy(x), real=True)
    metrics.update(torch.from_numpy(y), real=False)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # 10 + 1 + 1 + 6.25
    assert expected == pytest.approx(18.25)
    assert metrics.compute()["fid"] == pytest.approx(expected, rel=1e-9)


def kid_reference(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 estimator (Gretton et al. 2012, eq. 3) with KID's kernel (x.y / d + 1)^3, written out."""
    m, n, d = len(x), len(y), x.shape[1]
    k = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(12, 5)), rng.normal(loc=0.7, size=(12, 5))
    # One subset holding every sample: the estimator does not depend on the order, so no randomness is left.
    metrics = passthrough_metrics(5, kid_subsets=1, kid_subset_size=12)
    metrics.update(torch.from_numpy(x), real=True)
    metrics.update(torch.from_numpy(y), real=False)
    out = metrics.compute()
    assert out["kid"] == pytest.approx(kid_reference(x, y), rel=1e-9)
    assert out["kid"] > 0.05 and out["kid_std"] == 0.0
    # The generated set replaced, the real one kept: a new estimate, still the write-out.
    metrics.reset_generated()
    z = rng.normal(size=(12, 5))
    metrics.update(torch.from_numpy(z), real=False)
    assert metrics.compute()["kid"] == pytest.approx(kid_reference(x, z), rel=1e-9)


def test_kid_subsets_are_capped_by_the_set_sizes_and_seeded():
    rng = np.random.default_rng(3)
    metrics = passthrough_metrics(4, kid_subsets=20, kid_subset_size=1000)
    metrics.update(torch.from_numpy(rng.normal(size=(9, 4))), real=True)
    metrics.update(torch.from_numpy(rng.normal(size=(7, 4))), real=False)
    first = metrics.compute()
    assert metrics.kid.subset_size == 7
    assert metrics.compute() == first  # the subsets come from a fixed seed
    assert first["kid_std"] > 0  # and do differ from each other


def test_too_few_images_is_one_line():
    metrics = passthrough_metrics(3)
    metrics.update(torch.zeros(1, 3, dtype=torch.float64), real=True)
    with pytest.raises(LdmError, match="at least 2 real and 2 generated images, got 1 and 0"):
        metrics.compute()


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    return write_inception_weights(tmp_path_factory.mktemp("inception") / INCEPTION_FILE)


def image_batch(seed, n=6, size=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_fid_and_kid_from_a_local_inception_file_match_torchmetrics_own(inception_file):
    """Our one-pass FID equals torchmetrics' FrechetInceptionDistance given the same file (64-d taps: fast)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = image_batch(0), image_batch(1) // 2  # darker: a different distribution
    ours = InceptionMetrics.from_file(inception_file, features=64)
    theirs = FrechetInceptionDistance(feature=64, feature_extractor_weights_path=str(inception_file))
    for metrics in (ours, theirs):
        metrics.update(real, real=True)
        metrics.update(fake, real=False)
    fid = ours.compute()["fid"]
    assert fid > 1e-3
    assert fid == pytest.approx(float(theirs.compute()), rel=1e-4)
    # A set against itself: ~0 (the eigenvalue square root leaves float round-off only).
    ours.reset_generated()
    ours.update(real, real=False)
    assert abs(ours.compute()["fid"]) < 1e-6 * fid


def test_the_2048_feature_network_loads_and_gives_2048_features(inception_file):
    net = load_inception(inception_file)
    features = net(image_batch(2, n=2, size=32))
    assert features.shape == (2, 2048) and features.std() > 1e-3  # He-initialised: not vanishing


def test_model_range_images_round_as_files_do():
    x = torch.tensor([-1.0, -0.996, 0.0, 1.0, 1.5]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert from_model_range(x)[0, 0, 0].tolist() == [0, 1, 128, 255, 255]


class Exploit:
    def __reduce__(self):
        return (print, ("pickled code ran",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the code-pickle case: torch notes the protocol
@pytest.mark.parametrize("case", ["unset", "missing", "not-torch", "code-pickle", "foreign", "wrong-shapes", "bad-features"])
def test_inception_file_errors_are_one_line(tmp_path, inception_file, case):
    path = tmp_path / "w.pth"
    words = {
        "unset": ["FID and KID needs --inception-weights", INCEPTION_FILE, "torch-fidelity/releases"],
        "missing": ["--inception-weights: no file at", INCEPTION_FILE],
        "not-torch": ["cannot read", INCEPTION_FILE],
        "code-pickle": ["cannot read", "tensor state dict"],
        "foreign": ["is not torch-fidelity's Inception-v3 state dict"],
        "wrong-shapes": ["is not torch-fidelity's Inception-v3 state dict", "size mismatch"],
        "bad-features": ["must be one of 64, 192, 768, 2048"],
    }[case]
    features = 2048
    if case == "not-torch":
        path.write_text("hello")
    if case == "code-pickle":
        path.write_bytes(pickle.dumps({"fc.weight": Exploit()}))
    if case == "foreign":
        torch.save({"conv.weight": torch.zeros(1)}, path)
    if case == "wrong-shapes":
        state = torch.load(inception_file, weights_only=True)
        state["fc.weight"] = torch.zeros(10, 2048)
        torch.save(state, path)
    if case == "bad-features":
        path, features = inception_file, 100
    with pytest.raises(LdmError) as e:
        load_inception(None if case == "unset" else path, features=features)
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message


# ---------------------------------------------------------------- CLIP score

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a purple circle"]


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    return write_hf_clip_folder(tmp_path_factory.mktemp("hf_clip"))


def test_clip_score_formula_matches_torchmetrics_on_the_same_transformers_clip(hf_clip):
    folder, model, processor = hf_clip
    images = image_batch(4, n=4, size=24)
    formula = FormulaClipScore(*hf_encoders(model, processor))
    per_pair = formula.per_pair(images, PROMPTS)
    assert per_pair.std() > 1e-3  # random weights, but the pairs differ
    loaded = load_hf_clip(folder)  # torchmetrics' CLIPScore on the folder's model
    assert loaded(images, PROMPTS) == pytest.approx(max(per_pair.double().mean().item(), 0.0), abs=1e-4)
    # Direct float64 write-out of 100 * cos on the projected features.
    with torch.no_grad():
        inputs = processor(text=PROMPTS, images=list(images), return_tensors="pt", padding=True)
        out = model(**inputs)
    img, txt = out.image_embeds.double(), out.text_embeds.double()
    cos = (img * txt).sum(-1) / (img.norm(dim=-1) * txt.norm(dim=-1))
    np.testing.assert_allclose(per_pair.numpy(), (100 * cos).numpy(), rtol=1e-4, atol=1e-4)


def test_clip_score_clamps_the_mean_at_zero_as_torchmetrics():
    encode_images = lambda images: torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # noqa: E731
    negative = FormulaClipScore(encode_images, lambda prompts: torch.tensor([[-1.0, 0.1], [1.0, 0.0]]))
    assert negative.per_pair(torch.zeros(2, 3, 4, 4), ["a", "b"]).tolist() == pytest.approx([-99.504, 100.0], abs=1e-3)
    assert negative(torch.zeros(2, 3, 4, 4), ["a", "b"]) == pytest.approx(0.248, abs=1e-3)  # the mean, not per pair
    assert FormulaClipScore(encode_images, lambda p: -encode_images(p))(torch.zeros(2, 3, 4, 4), ["a", "b"]) == 0.0


def test_open_clip_from_a_name_and_a_weights_file(tmp_path):
    name, path, model = write_open_clip_weights(tmp_path)
    scorer = load_open_clip(name, path)
    images = image_batch(5, n=4, size=24)
    per_pair = scorer.per_pair(images, PROMPTS)
    # The same model in memory, preprocessed by hand as open_clip's eval transform does (bicubic resize, crop, normalise).
    import open_clip
    from PIL import Image

    _, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in images]))
        txt = model.encode_text(tokenizer(PROMPTS))
    cos = torch.nn.functional.cosine_similarity(img.double(), txt.double())
    np.testing.assert_allclose(per_pair.numpy(), (100 * cos).numpy(), rtol=1e-4, atol=1e-4)
    assert per_pair.std() > 1e-3


@pytest.mark.parametrize("case", ["none", "open-clip-unset", "open-clip-missing", "open-clip-unknown", "hf-missing", "both"])
def test_clip_errors_are_one_line(tmp_path, case):
    kwargs, words = {
        "none": ({}, ["CLIP score needs a local CLIP", "--clip-model", "--clip-folder"]),
        "open-clip-unset": ({"open_clip_name": "ViT-B-32"}, ["needs --clip-weights", "open_clip_pytorch_model.bin"]),
        "open-clip-missing": ({"open_clip_name": "ViT-B-32", "open_clip_weights": str(tmp_path / "x.bin")},
                              ["--clip-weights: no file at", "open_clip_pytorch_model.bin"]),
        "open-clip-unknown": ({"open_clip_name": "ViT-Q-99", "open_clip_weights": __file__}, ["no model named 'ViT-Q-99'"]),
        "hf-missing": ({"hf_folder": str(tmp_path)}, ["--clip-folder", "config.json", "huggingface-cli download"]),
        "both": ({"hf_folder": str(tmp_path), "open_clip_name": "ViT-B-32"}, ["not both"]),
    }[case]
    with pytest.raises(LdmError) as e:
        load_clip(**kwargs)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_errors_name_the_callers_config_keys(tmp_path):
    """A training config that evaluates passes its own keys: the errors name those, not the flags."""
    keys = {"name": "eval.clip_model", "weights": "eval.clip_weights", "folder": "eval.clip_folder"}
    with pytest.raises(LdmError, match=r"needs eval.clip_weights .*open_clip_pytorch_model.bin"):
        load_clip("ViT-B-32", settings=keys)
    with pytest.raises(LdmError, match="eval.clip_model NAME eval.clip_weights FILE"):
        load_clip(settings=keys)
    with pytest.raises(LdmError, match=f"FID and KID needs eval.inception_weights .*{INCEPTION_FILE}"):
        InceptionMetrics.from_file(None, setting="eval.inception_weights")


def test_open_clip_formula_agrees_with_torchmetrics_on_the_same_weights(tmp_path, hf_clip):
    """One random CLIP twice: open_clip (our formula) and the same tensors in a transformers CLIPModel
    (torchmetrics' CLIPScore). 32x32 images: both preprocessors leave them unresized."""
    from eval_files import open_clip_as_transformers

    name, path, model = write_open_clip_weights(tmp_path, seed=3)
    _, _, processor = hf_clip  # the CLIP BPE tokenizer and an image processor at 32 px
    hf = open_clip_as_transformers(model)
    images = image_batch(6, n=4, size=32)
    ours = load_open_clip(name, path).per_pair(images, PROMPTS)
    theirs = FormulaClipScore(*hf_encoders(hf, processor)).per_pair(images, PROMPTS)
    assert ours.std() > 1e-2
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=2e-4)  # 3e-5 measured
    from ldm.eval.clip_score import TorchmetricsClipScore, aggregate

    # torchmetrics' aggregate on the pairs that score above 0 (over all four the mean is clamped to 0).
    keep = ours > 0
    assert keep.any() and not keep.all()
    kept = [p for p, k in zip(PROMPTS, keep) if k]
    assert TorchmetricsClipScore(hf, processor)(images[keep], kept) == pytest.approx(aggregate(ours[keep]), abs=2e-4)
    assert aggregate(ours[keep]) > 1 and aggregate(ours) == 0.0
