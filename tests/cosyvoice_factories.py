"""Tiny random CosyVoice 2 checkpoints (flow.pt, hift.pt, the yaml) written in CosyVoice's own layout."""
from __future__ import annotations

from collections import OrderedDict

import torch


# --- HiFT (hift.pt) ------------------------------------------------------------------------------------------------

TINY_HIFT = dict(in_channels=80, base_channels=16, nb_harmonics=8, sampling_rate=24000, nsf_alpha=0.1,
                 nsf_sigma=0.003, nsf_voiced_threshold=10, upsample_rates=[8, 5, 3], upsample_kernel_sizes=[16, 11, 7],
                 istft_params={"n_fft": 16, "hop_len": 4}, resblock_kernel_sizes=[3, 7, 11],
                 resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]], source_resblock_kernel_sizes=[7, 7, 11],
                 source_resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]], lrelu_slope=0.1, audio_limit=0.99,
                 f0_predictor={"num_class": 1, "in_channels": 80, "cond_channels": 16})


def hift_weight_normed(name: str) -> bool:
    """Whether CosyVoice wraps this HiFT layer (a state-dict prefix) in weight_norm: conv_pre, ups, conv_post, every
    ResBlock convolution and the F0 predictor's convolutions; not source_downs, l_linear or the classifier."""
    return (name in ("conv_pre", "conv_post") or name.startswith("ups.") or ".convs1." in name
            or ".convs2." in name or name.startswith("f0_predictor.condnet."))


def random_hift(mapping: dict = TINY_HIFT, seed: int = 0):
    """A HiftGenerator with random weights of roughly trained scale: F0 well above the voiced threshold for some
    frames, Snake alphas away from 1, so every part of the source and filter does something."""
    from chorus.tts.cosyvoice.hift import HiftConfig, HiftGenerator
    model = HiftGenerator(HiftConfig.from_mapping(mapping))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("alpha"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
        model.f0_predictor.classifier.weight.mul_(40.0)  # F0 of tens to hundreds of Hz: voiced and unvoiced frames
        model.conv_post.weight.mul_(0.1)  # log-magnitudes near 0: audio well inside the clamp, not chaotic
    return model.eval()


def hift_official_state(model, weight_norm: str = "parametrizations", prefix: str = "", seed: int = 1) -> dict:
    """model's weights under CosyVoice's names, weight norm unfolded the way torch stores it: `parametrizations`
    (x.parametrizations.weight.original0 = g, original1 = v; what CosyVoice 2 saves) or `weight_g` (x.weight_g,
    x.weight_v; older torch). v is the weight times a random positive scale per output row, so loading must
    normalize it."""
    gen = torch.Generator().manual_seed(seed)
    out = OrderedDict()
    for key, value in model.state_dict().items():
        base = key[:-len(".weight")] if key.endswith(".weight") else None
        if base is not None and hift_weight_normed(base):
            g = value.norm(2, dim=tuple(range(1, value.dim())), keepdim=True)
            v = value * (0.5 + torch.rand(g.shape, generator=gen))
            if weight_norm == "parametrizations":
                out[f"{prefix}{base}.parametrizations.weight.original0"] = g.clone()
                out[f"{prefix}{base}.parametrizations.weight.original1"] = v
            elif weight_norm == "weight_g":
                out[f"{prefix}{base}.weight_g"] = g.clone()
                out[f"{prefix}{base}.weight_v"] = v
            else:
                raise ValueError(weight_norm)
        else:
            out[prefix + key] = value.clone()
    return out


def write_hift(path, mapping: dict = TINY_HIFT, seed: int = 0, weight_norm: str = "parametrizations",
               prefix: str = ""):
    """hift.pt as CosyVoice saves it (a plain state dict); returns the HiftGenerator it holds."""
    model = random_hift(mapping, seed)
    torch.save(hift_official_state(model, weight_norm, prefix), path)
    return model


def hift_yaml(mapping: dict = TINY_HIFT) -> str:
    """The yaml's `hift:` section as CosyVoice writes it (HyperPyYAML tags, sampling_rate by !ref)."""
    m = dict(mapping)
    f0 = m.pop("f0_predictor")
    istft = m.pop("istft_params")
    lines = ["hift: !new:cosyvoice.hifigan.generator.HiFTGenerator"]
    for k, v in m.items():
        lines.append(f"    {k}: !ref <sample_rate>" if k == "sampling_rate" else f"    {k}: {v}")
    lines += ["    istft_params:", f"        n_fft: {istft['n_fft']}", f"        hop_len: {istft['hop_len']}",
              "    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor"]
    lines += [f"        {k}: {v}" for k, v in f0.items()]
    return "\n".join(lines) + "\n"


# --- the flow (flow.pt) and the model directory ------------------------------------------------------------------

TINY_FLOW = dict(vocab_size=100, spk_embed_dim=192, encoder_dim=64, attention_heads=2, linear_units=128,
                 num_blocks=2, estimator_channels=32, attention_head_dim=16, num_heads=2, n_blocks=1,
                 num_mid_blocks=2, act_fn="gelu")


def flow_yaml(sizes: dict = TINY_FLOW) -> str:
    """The yaml's top keys and `flow:` section as CosyVoice 2 writes them (tags, !ref, the arithmetic !ref)."""
    s = sizes
    return f"""# set random seed, so that you may reproduce your result.
__set_seed1: !apply:random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]

# fixed params
sample_rate: 24000
llm_input_size: 896
llm_output_size: 896
spk_embed_dim: {s['spk_embed_dim']}
qwen_pretrain_path: ''
token_frame_rate: 25
token_mel_ratio: 2

# stream related params
chunk_size: 25 # streaming inference chunk size, in token
num_decoding_left_chunks: -1 # streaming inference flow decoder left chunk size, <0 means use all left chunks

llm: !new:cosyvoice.llm.llm.Qwen2LM
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    speech_token_size: {s['vocab_size']}
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8

flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec
    input_size: {s['encoder_dim']}
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: {s['vocab_size']}
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    encoder: !new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder
        output_size: {s['encoder_dim']}
        attention_heads: {s['attention_heads']}
        linear_units: {s['linear_units']}
        num_blocks: {s['num_blocks']}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: {s['encoder_dim']}
        use_cnn_module: False
        macaron_style: False
        static_chunk_size: !ref <chunk_size>
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.CausalConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [{s['estimator_channels']}]
            dropout: 0.0
            attention_head_dim: {s['attention_head_dim']}
            n_blocks: {s['n_blocks']}
            num_mid_blocks: {s['num_mid_blocks']}
            num_heads: {s['num_heads']}
            act_fn: '{s['act_fn']}'
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks: !ref <num_decoding_left_chunks>

"""


def random_flow(sizes: dict = TINY_FLOW, seed: int = 0):
    """A CosyVoiceFlow with random weights of a trained-like scale (LayerNorm gains near 1, small biases), so that
    every layer changes the mel and chunks that depend on each other would show it."""
    from chorus.tts.cosyvoice.checkpoint import flow_config
    from chorus.tts.cosyvoice.config import read_cosyvoice_yaml
    from chorus.tts.cosyvoice.flow import CosyVoiceFlow
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "y.yaml").write_text(flow_yaml(sizes))
        cfg = flow_config(read_cosyvoice_yaml(Path(tmp) / "y.yaml"))
    model = CosyVoiceFlow(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight") or name.endswith("block.2.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias") or "pos_bias" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    return model.eval()


def write_flow(path, sizes: dict = TINY_FLOW, seed: int = 0):
    """flow.pt as CosyVoice saves it (the module's plain state dict); returns the CosyVoiceFlow it holds."""
    model = random_flow(sizes, seed)
    torch.save(OrderedDict((k, v.clone()) for k, v in model.state_dict().items()), path)
    return model


def write_cosyvoice2_dir(root, flow_sizes: dict = TINY_FLOW, hift_mapping: dict | None = None, seed: int = 0):
    """A CosyVoice2 model directory (cosyvoice2.yaml, flow.pt, hift.pt) with tiny random weights; returns
    (flow, hift) modules as written (hift None when hift.py's factory is not given a mapping and fails)."""
    from pathlib import Path
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    mapping = TINY_HIFT if hift_mapping is None else hift_mapping
    (root / "cosyvoice2.yaml").write_text(flow_yaml(flow_sizes) + hift_yaml(mapping))
    flow = write_flow(root / "flow.pt", flow_sizes, seed)
    hift = write_hift(root / "hift.pt", mapping, seed)
    return flow, hift
