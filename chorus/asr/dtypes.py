"""The compute dtypes an ASR model may run in (`--dtype`), and the rule for switching a loaded model.

Each family puts its model into a dtype in place (conformer/precision.py, paraformer/precision.py,
whisper/family.py); a model switches once, from fp32, since casting or quantizing again would compound
the rounding of the first switch."""
from __future__ import annotations

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
