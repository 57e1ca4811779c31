"""Compute dtypes of a FastConformer (`--dtype`): fp32 (NeMo's), bf16, int8.

* fp32: the checkpoint as it is.
* bf16: the encoder's blocks (feed-forwards, attention, convolution module) and its streaming state (the K/V and
  conv rings) in bfloat16. The residual stream between the blocks and the five layer norms that read it stay fp32,
  with the checkpoint's exact weights (`cast_to_bf16`); each residual add and the norm after it are one pass of
  chorus' kernel (`residual_norm.add_norm`), so this mix runs faster than the all-bf16 layer did, where in torch its
  mixed-dtype adds and casts had cost 4-17 % of a step (bench/README.md, "The fp32 residual stream and chorus' bf16
  kernels"). The subsampling's first convolution stays fp32 (its input is the log-mel, which bf16 would round to 3
  significant digits), and so do the convolutions after it but the last pointwise one (`dw_striding` x8: the two
  depthwise convolutions and the pointwise one between them; the last pointwise one and the output projection are
  bf16). The subsampling has no residual stream to dilute its roundings: with the pointwise convolution and the
  second depthwise one in bf16 the trained model's streamed encoder output was 0.50 % (RMS) from fp32's instead of
  0.41 %. The first convolution (product, bias, ReLU) and the depthwise one after it are one pass of chorus' kernel
  (`subsample_first_two`): the first one's output, the largest tensor of a step, never goes to memory, which pays
  for the pointwise product in fp32. The convolution module's depthwise convolution and its norm keep fp32 weights
  too, and run with the Swish after them as one kernel pass over the bf16 window (`depthwise.depthwise_norm_silu`),
  rounding once at the end. The attention over the K/V ring (the content and positional scores, softmax, the
  weighted sum of the values) is one kernel pass per layer in fp32 sums, rounding once (`_ring_attention`); torch's
  fused attention took ~15 % of a 16-stream step on an AMD EPYC without AMX. The layers' output (and the output
  projection, where there is one) is fp32, so the encoder output the decoders read is not rounded to bf16. The
  trained model's encoder output is 0.41 % (RMS) from fp32's; 0.50 % with only the subsampling's first depthwise
  convolution in fp32, 0.64 % with none, 0.84 % with torch's attention too, 1.06 % with the residual and norms in
  bf16 too, and 1.80 % when the first convolution's weights were cast to bf16 and back (until 2026-12-03). The RNNT
  products that a label step repeats (the predictor LSTM's and the joint's encoder and predictor projections, 8 of
  the ~11 MB of weights a label step reads at the real size) run in bf16 with fp32 inputs and outputs
  (`heads.product`): the greedy loop x1.13 / x1.64 faster at 16 / 64 streams, and no WER worse than with them in
  fp32 (bench/README.md, "bf16 RNNT products"); the loop's LSTM cell for the streams that emitted runs as one kernel
  pass (`heads.step_emitting`, the loop x1.25-1.32 faster). The LSTM state, the gates' sums, the joint's output
  layer (the logits the beam search and the LM score) and the CTC head stay fp32: with the output layer in bf16 too
  the loop gained x1.34 / x2.29 but the 200 awb sentences lost 0.41 points with beam + LM against fp32 decoders (15
  worse, 9 better).
* int8: every matrix product of the encoder (subsampling output, Q/K/V, attention output, both
  feed-forwards, both pointwise convolutions) runs as int8 x int8 -> int32 with `torch._int_mm`
  (ATen's integer GEMM, oneDNN/VNNI on x86; what torchao's int8 dynamic-activation path calls):
  weights quantized once per output channel (symmetric), activations per token at each call
  (dynamic, symmetric).  Norms, attention scores, the depthwise conv and the decoders stay fp32.
  This is neither the deprecated `torch.ao.quantization` eager API nor its quantized tensors
  (`Int8Linear`, chorus/asr/int8_linear.py, shared with the other families).
"""
from __future__ import annotations

import torch
from torch import nn

from ..dtypes import cast_to_bf16, needs_switch
from ..int8_linear import Int8Linear
from .asr_model import FastConformerModel


_RESIDUAL_NORMS = ("norm_feed_forward1", "norm_self_att", "norm_conv", "norm_feed_forward2", "norm_out")


def apply_dtype(model: FastConformerModel, dtype: str) -> FastConformerModel:
    """Put `model` (in place) into the compute dtype named `dtype`; returns it."""
    if not needs_switch(getattr(model, "dtype_name", "fp32"), dtype, "fastconformer"):
        return model
    if dtype == "bf16":
        enc = model.encoder
        fp32_parts = [getattr(layer, name) for layer in enc.layers for name in _RESIDUAL_NORMS]
        fp32_parts += [m for layer in enc.layers for m in (layer.conv.depthwise_conv, layer.conv.batch_norm)]
        fp32_parts += [enc.pre_encode.conv[0]] + _subsampling_fp32_convs(enc.pre_encode.conv)
        cast_to_bf16(enc, fp32_parts + ([enc.out_proj] if enc.out_proj is not None else []))
        for layer in enc.layers:
            layer.fp32_residual = True
        if model.decoder is not None:  # the RNNT products: LSTM and joint weights (heads.product)
            for module in (model.decoder.prediction["dec_rnn"], model.joint.enc, model.joint.pred):
                cast_to_bf16(module)
    elif dtype == "int8":
        quantize_encoder_int8(model.encoder)
    model.dtype_name = dtype
    return model


def _subsampling_fp32_convs(convs: nn.Sequential) -> list[nn.Module]:
    """The subsampling convolutions after the first that the bf16 path keeps fp32: for `dw_striding`, each
    depthwise convolution and each pointwise one but the last; none for `striding` (full convolutions, which cost
    too much in fp32)."""
    later = [m for m in convs[1:] if isinstance(m, nn.Conv2d)]
    if not later or not all(m.groups == m.in_channels or m.kernel_size == (1, 1) for m in later):
        return []
    return later[:-1] if later[-1].kernel_size == (1, 1) else later


@torch.no_grad()
def quantize_encoder_int8(encoder: nn.Module) -> None:
    pre = encoder.pre_encode
    pre.out = Int8Linear.of(pre.out)
    for layer in encoder.layers:
        for ff in (layer.feed_forward1, layer.feed_forward2):
            ff.linear1, ff.linear2 = Int8Linear.of(ff.linear1), Int8Linear.of(ff.linear2)
        attn = layer.self_attn
        attn.qkv_int8 = Int8Linear(torch.cat([attn.linear_q.weight, attn.linear_k.weight, attn.linear_v.weight]),
                                   None if attn.linear_q.bias is None else
                                   torch.cat([attn.linear_q.bias, attn.linear_k.bias, attn.linear_v.bias]))
        del attn.linear_q, attn.linear_k, attn.linear_v  # replaced by the fused int8 product
        attn.linear_out = Int8Linear.of(attn.linear_out)
        conv = layer.conv
        conv.pointwise_conv1, conv.pointwise_conv2 = Int8Linear.of(conv.pointwise_conv1), \
            Int8Linear.of(conv.pointwise_conv2)
    if encoder.out_proj is not None:
        encoder.out_proj = Int8Linear.of(encoder.out_proj)
