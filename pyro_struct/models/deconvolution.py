"""The stochastic deconvolution model of Weilbach et al. (2020): image and filter to a strided convolution."""

import pyro
import pyro.distributions as dist
import torch

__all__ = ["deconvolution", "strided_convolution"]


def strided_convolution(image: torch.Tensor, kernel: torch.Tensor, stride: int) -> torch.Tensor:
    """Valid 2-D cross-correlation with a stride, batched over leading dimensions.

    Args:
        image: ``(*batch, H, W)``.
        kernel: ``(*batch, k, k)`` (broadcasts against ``image``'s batch).
        stride: step between windows.

    Returns:
        ``(*batch, (H - k) // stride + 1, (W - k) // stride + 1)``.
    """
    k = kernel.shape[-1]
    patches = image.unfold(-2, k, stride).unfold(-2, k, stride)  # (*batch, oh, ow, k, k)
    return (patches * kernel[..., None, None, :, :]).sum((-1, -2))


def deconvolution(image_size: int = 9, kernel_size: int = 3, stride: int = 2, noise_scale: float = 0.1):
    """Image ``~ N(0, 1)`` per pixel, filter ``~ N(0, 1)`` per weight, output ``~ N(conv(image, filter), noise)``.

    With the defaults: a 9x9 image, a 3x3 filter, stride 2 and a 4x4 output. Observed sites:
    ``output`` and ``kernel``; the latent is ``image``. Each output pixel depends on a 3x3
    window of the image and on the whole filter.

    Returns:
        A Pyro model ``model(kernel=None, output=None)``.
    """
    out = (image_size - kernel_size) // stride + 1
    if out < 1:
        raise ValueError(f"a {kernel_size}x{kernel_size} filter does not fit a {image_size}x{image_size} image")

    def model(kernel=None, output=None):
        zero = torch.zeros(())
        image = pyro.sample(
            "image", dist.Normal(zero, 1.0).expand([image_size, image_size]).to_event(2)
        )
        kernel = pyro.sample(
            "kernel", dist.Normal(zero, 1.0).expand([kernel_size, kernel_size]).to_event(2), obs=kernel
        )
        mean = strided_convolution(image, kernel, stride)
        pyro.sample("output", dist.Normal(mean, noise_scale).to_event(2), obs=output)
        return image

    model.__name__ = "deconvolution"
    model.observed_sites = ["kernel", "output"]
    return model
