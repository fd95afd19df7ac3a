"""The denoiser and the comparison shared by the k-diffusion tests (test_integration_k_diffusion.py,
test_k_diffusion_surface.py)."""
import torch

MU = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0))


def model(x, sigma, shift=0.0):
    """A smooth nonlinear denoiser: Gaussian posterior mean around MU plus a small tanh term."""
    s = sigma.view(-1, 1, 1, 1)
    return (x + 0.5 * s ** 2 * (MU + shift)) / (1 + 0.5 * s ** 2) + 0.1 * torch.tanh(x)


def close(a, b, rel=1e-5):
    assert a.shape == b.shape and a.dtype == b.dtype
    err, scale = (a - b).abs().max().item(), a.abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel} * {scale:.3g}"
