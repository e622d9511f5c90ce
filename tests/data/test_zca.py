"""ZCA whitening through kornia (optional dependency): the stored transform equals kornia's and whitens."""
import pytest
import torch

from iwd_fast.data.zca import ZCATransform, fit_zca

kornia = pytest.importorskip("kornia")


def test_fitted_transform_equals_kornia_and_whitens():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(16, 16, generator=g) / 4 + torch.eye(16)
    x = (torch.randn(4000, 16, generator=g) @ mix + 3.0).view(4000, 1, 4, 4)
    zca = fit_zca(x, eps=1e-6)
    ref = kornia.enhance.ZCAWhitening(eps=1e-6)
    ref.fit(x)
    torch.testing.assert_close(zca(x), ref(x), rtol=1e-5, atol=1e-5)
    z = zca(x).flatten(1)
    z = z - z.mean(0)
    cov = z.T @ z / (z.shape[0] - 1)
    torch.testing.assert_close(cov, torch.eye(16), rtol=0, atol=1e-3)
    again = ZCATransform(**{k.split("_")[1]: v for k, v in zca.tensors().items()})
    held = torch.randn(7, 1, 4, 4, generator=g)
    assert torch.equal(again(held), zca(held))  # the saved tensors whiten another split the same way
    with pytest.raises(ValueError, match="fitted for 16"):
        zca(torch.randn(2, 1, 5, 5))
