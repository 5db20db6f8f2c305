"""A few features of an SAE's encoding: the columns asked for, never the whole width.

Measuring the effect of a patch on k later features needs k columns of the later SAE's code,
not 24,576: `encode_columns(sae, x, cols)` equals `sae.encode(x)[..., cols]` for the SAE
architectures whose encoding is per feature (SAELens' standard ReLU and JumpReLU SAEs) and costs
k/d_sae of it. Any other architecture (top-k, gated, ...) is refused in one line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from featstore.errors import FeatstoreError

if TYPE_CHECKING:
    import torch
    from sae_lens import SAE


def check_columnwise(sae: SAE, layer: int) -> None:
    """The SAE's encoding must be computable feature by feature."""
    from sae_lens import JumpReLUSAE, StandardSAE

    if type(sae) not in (StandardSAE, JumpReLUSAE) or sae.cfg.reshape_activations != "none":
        raise FeatstoreError(
            f"SAE of layer {layer} ({type(sae).__name__}) does not encode feature by feature: "
            "causal edges need a standard or JumpReLU SAE"
        )


def encode_columns(sae: SAE, x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """`sae.encode(x)[..., cols]` (x: (..., d_in), cols: (k,) on x's device) -> (..., k)."""
    from sae_lens import JumpReLUSAE

    pre = sae.process_sae_in(x) @ sae.W_enc[:, cols] + sae.b_enc[cols]
    acts = sae.activation_fn(pre)
    if isinstance(sae, JumpReLUSAE):
        acts = acts * (pre > sae.threshold[cols]).to(acts.dtype)
    return acts
