"""The compute dtypes an ASR model may run in (`--dtype`), and the rule for switching a loaded model.

Each family puts its model into a dtype in place (conformer/precision.py, paraformer/precision.py,
whisper/family.py); a model switches once, from fp32, since casting or quantizing again would compound
the rounding of the first switch."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

DTYPES = ("fp32", "bf16", "int8")


def needs_switch(current: str, wanted: str, family: str) -> bool:
    """Whether a model of `family` computing in `current` must be put into `wanted`; raises ValueError
    for a dtype no family offers or for a second switch."""
    if wanted not in DTYPES:
        raise ValueError(f"--dtype {wanted}: the {family} family computes in {', '.join(DTYPES)}")
    if wanted == current:
        return False
    if current != "fp32":
        raise ValueError(f"the model already computes in {current}; load it again for {wanted}")
    return True


def cast_to_bf16(model: nn.Module, fp32: Iterable[nn.Module] = ()) -> None:
    """`model` in bfloat16 in place, but the submodules `fp32`, which keep their exact fp32 weights.  Cast to
    bf16 and back (`.to(bf16)` then `.float()`) they would stay rounded to bf16: that is how the FastConformer's
    first convolution, meant to compute in fp32, ran with rounded weights until 2026-12-03 and put the encoder
    output 1.80 % (RMS) from fp32's instead of 1.06 % (bench/README.md, "Where the bf16 error came from")."""
    fp32 = list(fp32)
    exact = [{name: t.clone() for name, t in module.state_dict().items()} for module in fp32]
    model.to(torch.bfloat16)
    for module, weights in zip(fp32, exact):
        module.float().load_state_dict(weights)
