"""Tiny random Matcha-TTS checkpoints written the way Matcha's training writes them (a Lightning `.ckpt`).

The hyper-parameters are what Hydra hands MatchaTTS: omegaconf DictConfigs (resolved, with their parent tree)
for encoder / decoder / cfm / data_statistics and a functools.partial for the optimizer, so
`torch.load(weights_only=True)` refuses the file, as it refuses Matcha's own checkpoints."""
from __future__ import annotations

import functools
import math
from collections import OrderedDict
from pathlib import Path

import torch
from omegaconf import OmegaConf

from chorus.tts.matcha.model import MatchaConfig, MatchaTTS
from chorus.tts.matcha.text import SYMBOLS

TINY = dict(n_feats=20, n_channels=32, filter_channels=64, filter_channels_dp=32, n_heads=2, n_layers=2,
            channels=[32, 32], attention_head_dim=16, num_heads=2, num_mid_blocks=1)
LJSPEECH = dict(n_feats=80, n_channels=192, filter_channels=768, filter_channels_dp=256, n_heads=2, n_layers=6,
                channels=[256, 256], attention_head_dim=64, num_heads=2, num_mid_blocks=2)


def hydra_config(size: dict, n_spks: int = 1, mel_mean: float = -5.536622, mel_std: float = 2.116101):
    """configs/model/matcha.yaml + encoder/decoder/cfm defaults + data/ljspeech.yaml, as one resolved DictConfig."""
    cfg = OmegaConf.create({
        "data": {"n_spks": n_spks, "load_durations": False, "n_feats": size["n_feats"],
                 "data_statistics": {"mel_mean": mel_mean, "mel_std": mel_std}},
        "model": {
            "_target_": "matcha.models.matcha_tts.MatchaTTS", "n_vocab": len(SYMBOLS), "n_spks": "${data.n_spks}",
            "spk_emb_dim": 64, "n_feats": size["n_feats"], "data_statistics": "${data.data_statistics}",
            "out_size": None, "prior_loss": True, "use_precomputed_durations": "${data.load_durations}",
            "encoder": {"encoder_type": "RoPE Encoder",
                        "encoder_params": {"n_feats": "${model.n_feats}", "n_channels": size["n_channels"],
                                           "filter_channels": size["filter_channels"],
                                           "filter_channels_dp": size["filter_channels_dp"],
                                           "n_heads": size["n_heads"], "n_layers": size["n_layers"],
                                           "kernel_size": 3, "p_dropout": 0.1, "spk_emb_dim": 64, "n_spks": 1,
                                           "prenet": True},
                        "duration_predictor_params": {
                            "filter_channels_dp": "${model.encoder.encoder_params.filter_channels_dp}",
                            "kernel_size": 3, "p_dropout": "${model.encoder.encoder_params.p_dropout}"}},
            "decoder": {"channels": size["channels"], "dropout": 0.05, "attention_head_dim": size["attention_head_dim"],
                        "n_blocks": 1, "num_mid_blocks": size["num_mid_blocks"], "num_heads": size["num_heads"],
                        "act_fn": "snakebeta"},
            "cfm": {"name": "CFM", "solver": "euler", "sigma_min": 1e-4},
        },
    })
    OmegaConf.resolve(cfg)  # hydra.utils.instantiate resolves before calling MatchaTTS
    return cfg


def random_matcha(size: dict = TINY, n_spks: int = 1, seed: int = 0, frames_per_symbol: float = 3.0):
    """(MatchaTTS with random weights, the Hydra config). Durations come out near frames_per_symbol."""
    cfg = hydra_config(size, n_spks)
    m = cfg.model
    mc = MatchaConfig(n_vocab=m.n_vocab, n_feats=m.n_feats, n_spks=n_spks, spk_emb_dim=m.spk_emb_dim,
                      n_channels=size["n_channels"], filter_channels=size["filter_channels"],
                      filter_channels_dp=size["filter_channels_dp"], n_heads=size["n_heads"],
                      n_layers=size["n_layers"], channels=tuple(size["channels"]),
                      attention_head_dim=size["attention_head_dim"], num_heads=size["num_heads"],
                      num_mid_blocks=size["num_mid_blocks"], act_fn="snakebeta",
                      mel_mean=m.data_statistics.mel_mean, mel_std=m.data_statistics.mel_std)
    torch.manual_seed(seed)
    model = MatchaTTS(mc)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("alpha", "beta")) and "ff.net.0" in name:
                p.normal_(0, 0.3)
            elif p.dim() == 1 and not name.endswith(("gamma", "weight")):
                p.normal_(0, 0.05)  # biases: not the zeros of a fresh init, so padding shows if it leaks
        pw = model.encoder.proj_w.proj
        pw.weight.mul_(0.05)
        pw.bias.fill_(math.log(frames_per_symbol))
    return model.eval(), cfg


class Booby:
    """Anything that runs code when unpickled: a file that an unrestricted loader would create."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def write_checkpoint(path: Path, model: MatchaTTS, cfg, booby_marker: Path | None = None,
                     extra_state: dict | None = None) -> Path:
    """A Lightning checkpoint in Matcha's layout (trainer.save_checkpoint of MatchaTTS)."""
    m = cfg.model
    hyper = {  # dict(model.hparams): MatchaTTS.__init__ arguments as Hydra passed them
        "n_vocab": m.n_vocab, "n_spks": m.n_spks, "spk_emb_dim": m.spk_emb_dim, "n_feats": m.n_feats,
        "encoder": m.encoder, "decoder": m.decoder, "cfm": m.cfm, "data_statistics": m.data_statistics,
        "out_size": m.out_size, "optimizer": functools.partial(torch.optim.Adam, lr=1e-4, weight_decay=0.0),
        "scheduler": None, "prior_loss": True, "use_precomputed_durations": False,
    }
    state = OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())
    state.update(extra_state or {})
    first = next(iter(state.values()))
    ckpt = {
        "epoch": 3, "global_step": 1200, "pytorch-lightning_version": "2.1.2", "state_dict": state,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4, "completed": 3}}}},
        "callbacks": {"ModelCheckpoint{'monitor': None, 'mode': 'min'}": {
            "best_model_score": torch.tensor(0.5), "best_model_path": "/runs/last.ckpt", "dirpath": "/runs"}},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(1200.0), "exp_avg": torch.zeros_like(first)}},
                              "param_groups": [{"lr": 1e-4, "params": [0]}]}],
        "lr_schedulers": [], "hparams_name": "kwargs", "hyper_parameters": hyper,
    }
    if booby_marker is not None:
        ckpt["callbacks"]["Booby"] = Booby(booby_marker)
    torch.save(ckpt, path)
    return path
