"""LPIPS-VGG from local weight files: the formula, the layers it reads, the loading errors."""

import pytest
import torch
from torchvision.models.vgg import cfgs, make_layers

from ldm.errors import LdmError
from ldm.lpips import LPIPS
from lpips_files import write_lpips_weights


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_lpips_weights(tmp_path_factory.mktemp("lpips"))


@pytest.fixture(scope="module")
def lpips(files):
    return LPIPS.from_files(*files)


def images(n=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def reference_lpips(files, x, y):
    """LPIPS written out from the paper on torchvision's whole VGG16 feature stack, in float64:
    activations after relu1_2 .. relu5_3 (features 3, 8, 15, 22, 29), unit-normalised
    over channels, squared difference, weighted by the linear layer, spatial mean, summed."""
    vgg_state, lin_state = (torch.load(f, weights_only=True) for f in files)
    net = make_layers(cfgs["D"]).double()
    net.load_state_dict({k[len("features."):]: v for k, v in vgg_state.items() if k.startswith("features.")})
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64)[None, :, None, None]
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64)[None, :, None, None]
    hx, hy = (x.double() - shift) / scale, (y.double() - shift) / scale
    total, taps = 0, iter(range(5))
    for index, layer in enumerate(net[:30]):  # the last max-pool feeds nothing LPIPS reads
        hx, hy = layer(hx), layer(hy)
        if index in (3, 8, 15, 22, 29):
            w = lin_state[f"lin{next(taps)}.model.1.weight"].double().view(1, -1, 1, 1)
            nx = hx / (hx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            ny = hy / (hy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + ((nx - ny).pow(2) * w).sum(1).mean(dim=(1, 2))
    return total


def test_matches_the_formula_on_torchvisions_vgg(files, lpips):
    x, y = images(seed=0), images(seed=1)
    d = lpips(x, y)
    assert d.shape == (2, 1, 1, 1)
    assert torch.allclose(d.flatten().double(), reference_lpips(files, x, y), rtol=1e-4, atol=0)


def test_a_distance(lpips):
    x, y, z = images(seed=0), images(seed=1), images(seed=2)
    assert torch.equal(lpips(x, x), torch.zeros(2, 1, 1, 1))
    assert torch.allclose(lpips(x, y), lpips(y, x), rtol=1e-6)
    assert (lpips(x, y) > 0).all()
    # A slightly noisier copy is nearer than an unrelated image.
    assert (lpips(x, x + 0.05 * torch.randn_like(x)) < lpips(x, z)).all()


def test_frozen_but_differentiable_in_its_input(lpips):
    assert not any(p.requires_grad for p in lpips.parameters())
    assert not lpips.train().training  # never leaves eval mode: its Dropout must not drop
    x = images(seed=0).requires_grad_(True)
    lpips(x, images(seed=1)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_loads_the_files_weights(files, lpips):
    vgg_state, lin_state = (torch.load(f, weights_only=True) for f in files)
    assert torch.equal(lpips.slices[0][0].weight, vgg_state["features.0.weight"])
    assert torch.equal(getattr(lpips.slices[4], "28").bias, vgg_state["features.28.bias"])
    assert torch.equal(lpips.lins[3][1].weight, lin_state["lin3.model.1.weight"])


def test_errors_name_the_file_and_what_it_should_be(files, tmp_path):
    vgg, lin = files
    with pytest.raises(LdmError, match=r"lpips_vgg_weights: no file at .*nowhere.pth.*vgg16-397923af"):
        LPIPS.from_files(tmp_path / "nowhere.pth", lin)
    with pytest.raises(LdmError, match=r"lpips_vgg_weights: .*lpips-vgg-random.pth is not torchvision's VGG16.*features.0.weight"):
        LPIPS.from_files(lin, lin)  # the files swapped
    with pytest.raises(LdmError, match=r"lpips_linear_weights: .*vgg16-random.pth is not the LPIPS v0.1.*lin0.model.1.weight"):
        LPIPS.from_files(vgg, vgg)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(LdmError, match=r"cannot read .*garbage.pth"):
        LPIPS.from_files(vgg, garbage)
