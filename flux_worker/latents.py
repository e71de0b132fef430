"""The small math between a Flux transformer's output and its VAE: packed tokens back to a latent image, and the
decode step a tensor-parallel group runs on rank 0 (each family's `tp_decode`, flux_worker/families.py).

Our own copies of what diffusers keeps in private pipeline methods (`FluxPipeline._unpack_latents`,
`Flux2Pipeline._unpack_latents_with_ids` with `_prepare_latent_ids`, `Flux2Pipeline._unpatchify_latents`), so a
tensor-parallel group's decode does not depend on names a diffusers release may change. Like flux's own
`sampling.unpack`, a few lines each; tests/test_private_libraries.py checks each against diffusers' output.
"""

from __future__ import annotations

from typing import Any


def unpack_flux1(latents: Any, height: int, width: int, vae_scale_factor: int) -> Any:
    """FLUX.1: (B, H/16 * W/16, C*4) tokens of 2x2 latent patches -> (B, C, H/8, W/8)."""
    batch, _, channels = latents.shape
    # The VAE compresses 8x and packing takes 2x2 patches, so the latent side is a multiple of 2.
    height = 2 * (int(height) // (vae_scale_factor * 2))
    width = 2 * (int(width) // (vae_scale_factor * 2))
    latents = latents.view(batch, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(batch, channels // 4, height, width)


def unpack_flux2(latents: Any, grid_height: int, grid_width: int) -> Any:
    """FLUX.2: (B, h*w, C) tokens in row-major grid order (the position ids Flux2Pipeline gives its latents) ->
    (B, C, h, w). diffusers scatters the tokens by their ids; for that grid the scatter is this reshape."""
    batch, _, channels = latents.shape
    return latents.reshape(batch, grid_height, grid_width, channels).permute(0, 3, 1, 2)


def unpatchify_flux2(latents: Any) -> Any:
    """FLUX.2: (B, C*4, h, w) of 2x2 patches -> (B, C, 2h, 2w)."""
    batch, channels, height, width = latents.shape
    latents = latents.reshape(batch, channels // 4, 2, 2, height, width).permute(0, 1, 4, 2, 5, 3)
    return latents.reshape(batch, channels // 4, height * 2, width * 2)


# -- decoding a group's latents on rank 0: each family's `tp_decode` (families.py) ---------------------------


def decode_flux1(pipe: Any, vae: Any, latents: Any, height: int, width: int) -> list[Any]:
    """FluxPipeline's own decode step (unpack, unscale, AutoencoderKL), run where the planner put the VAE."""
    latents = unpack_flux1(latents, height, width, pipe.vae_scale_factor)
    latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
    image = vae.decode(latents.to(vae.device, vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil")


def decode_flux2(pipe: Any, vae: Any, latents: Any, height: int, width: int) -> list[Any]:
    """Flux2Pipeline's own decode step, run where the planner put the VAE: the packed tokens scattered back by
    their position ids, the VAE's batch-norm statistics undone, the 2x2 patches unfolded, AutoencoderKLFlux2.

    Copied from Flux2Pipeline.__call__ (diffusers 0.42.1, after the denoising loop), with our own unpacking
    (above); with output_type="latent" the pipeline returns the packed latents before these steps.
    tests/test_flux2_tensor_parallel.py checks that a group's images equal the pipeline's own."""
    scale = pipe.vae_scale_factor * 2
    # The position ids depend on the latent grid's shape only (Flux2Pipeline.prepare_latents: row-major).
    latents = unpack_flux2(latents, height // scale, width // scale)
    bn_mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
    bn_std = (vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).sqrt().to(latents.device,
                                                                                            latents.dtype)
    latents = unpatchify_flux2(latents * bn_std + bn_mean)
    image = vae.decode(latents.to(vae.device, vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil")
