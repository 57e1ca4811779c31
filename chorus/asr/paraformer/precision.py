"""Compute dtypes of a streaming Paraformer (`--dtype`): fp32 (FunASR's), bf16, int8.

* bf16: the encoder and decoder layers, and their caches in the slot pool (encoder look-back K/V,
  decoder FSMN inputs and cross-attention K/V), in bfloat16.  Kept fp32: the embedded input frames
  (the overlap carried between chunks), the encoder's final norm, so the predictor reads an unrounded
  encoder output, the CIF predictor and its integrate-and-fire (a token fires where the summed weights
  cross 1.0; a bf16 sum, 3 significant digits, would move fires), and the decoder's final norm and
  output layer (the logits).
* int8: every nn.Linear of the encoder and decoder layers (the fused Q/K/V, attention outputs,
  feed-forwards, the cross-attention's Q and K/V) as int8 x int8 -> int32 (`Int8Linear`: weights per
  output channel, activations per token at each call).  The FSMN convolutions, norms, attention scores,
  the predictor and the output layer stay fp32, and so does the state.

Both are a documented mix, like the FastConformer's (chorus/asr/conformer/precision.py).  No trained
Paraformer weights exist on these machines, so accuracy against fp32 is not measured; the tests check
the laws and the distance from fp32 on random weights.
"""
from __future__ import annotations

from ..dtypes import cast_to_bf16, needs_switch
from ..int8_linear import quantize_linears
from .model import ParaformerStreamingModel


def apply_dtype(model: ParaformerStreamingModel, dtype: str) -> ParaformerStreamingModel:
    """Put `model` (in place) into the compute dtype named `dtype`; returns it."""
    if not needs_switch(getattr(model, "dtype_name", "fp32"), dtype, "paraformer"):
        return model
    encoder, decoder = model.encoder, model.decoder
    if dtype == "bf16":
        cast_to_bf16(encoder, [encoder.after_norm])
        cast_to_bf16(decoder, [decoder.after_norm, decoder.output_layer])
    else:
        quantize_linears(encoder)
        quantize_linears(decoder, keep=(decoder.output_layer,))
    model.dtype_name = dtype
    return model
