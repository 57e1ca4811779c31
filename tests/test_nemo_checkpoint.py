"""The .nemo loader on checkpoints the tests write in NeMo's exact layout."""
import gzip
import io
import tarfile

import pytest
import torch
import yaml

from chorus.asr.conformer.checkpoint import load_fastconformer, nemo_config, save_fastconformer
from chorus.asr.conformer.model import ModelConfigError
from chorus.asr.nemo_archive import NemoFormatError, read_nemo, write_nemo
from factories import random_mel, tiny_model, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(32)


def test_round_trip_uses_every_weight(tmp_path, tokenizer):
    model = tiny_model(seed=3)
    path = tmp_path / "tiny.nemo"
    save_fastconformer(path, model, tokenizer)
    loaded = load_fastconformer(path)
    ours = model.state_dict()
    theirs = loaded.model.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    mel = random_mel(200)
    for decoder in ("rnnt", "ctc"):
        a = model.transcribe_offline(mel[None], torch.tensor([200]), (70, 6), decoder)[2]
        b = loaded.model.transcribe_offline(mel[None], torch.tensor([200]), (70, 6), decoder)[2]
        assert a == b
    assert loaded.tokenizer.decode(tokenizer.encode("ask not what")) == "ask not what"


def test_half_precision_weights_load_into_an_fp32_model(tmp_path, tokenizer):
    model = tiny_model(seed=3)
    full, half = tmp_path / "full.nemo", tmp_path / "half.nemo"
    save_fastconformer(full, model, tokenizer)
    save_fastconformer(half, model, tokenizer, weights_dtype=torch.float16)
    stored = read_nemo(half).state_dict
    assert stored["joint.joint_net.2.weight"].dtype == torch.float16
    with tarfile.open(full) as a, tarfile.open(half) as b:
        full_bytes, half_bytes = (t.getmember("./model_weights.ckpt").size for t in (a, b))
    assert half_bytes < 0.6 * full_bytes
    loaded = load_fastconformer(half).model.state_dict()
    for k, v in model.state_dict().items():
        assert loaded[k].dtype == v.dtype, k  # runs in fp32 (the laws are tested in fp32)
        expected = v.half().to(v.dtype) if v.is_floating_point() else v
        assert torch.equal(loaded[k], expected), k


def test_archive_layout_matches_nemo(tmp_path, tokenizer):
    path = tmp_path / "tiny.nemo"
    save_fastconformer(path, tiny_model(), tokenizer)
    with tarfile.open(path, "r:") as tar:  # NeMo >= 1.7 writes an uncompressed tar
        names = tar.getnames()
        cfg = yaml.safe_load(tar.extractfile("./model_config.yaml").read())
        state = torch.load(io.BytesIO(tar.extractfile("./model_weights.ckpt").read()), weights_only=True)
    assert "./model_config.yaml" in names and "./model_weights.ckpt" in names
    ref = cfg["tokenizer"]["model_path"]
    assert ref.startswith("nemo:") and f"./{ref[5:]}" in names
    assert cfg["target"].endswith("EncDecHybridRNNTCTCBPEModel")
    assert cfg["encoder"]["att_context_size"] == [[70, 13], [70, 6], [70, 1], [70, 0]]
    # NeMo's own parameter names, including the preprocessor buffers it saves.
    for key in ("preprocessor.featurizer.fb", "preprocessor.featurizer.window",
                "encoder.pre_encode.conv.0.weight", "encoder.pre_encode.conv.6.weight", "encoder.pre_encode.out.weight",
                "encoder.layers.1.self_attn.linear_pos.weight", "encoder.layers.0.self_attn.pos_bias_u",
                "encoder.layers.0.conv.depthwise_conv.weight", "encoder.layers.0.conv.batch_norm.weight",
                "decoder.prediction.embed.weight", "decoder.prediction.dec_rnn.lstm.weight_ih_l0",
                "joint.pred.weight", "joint.enc.weight", "joint.joint_net.2.weight",
                "ctc_decoder.decoder_layers.0.weight"):
        assert key in state, key


def test_gzip_archive_and_ctc_only_model(tmp_path, tokenizer):
    model = tiny_model(seed=4, rnnt=False)
    path = tmp_path / "ctc.nemo"
    save_fastconformer(path, model, tokenizer, gzip=True)
    with open(path, "rb") as f:
        assert f.read(2) == b"\x1f\x8b"
    state = read_nemo(path).state_dict
    assert "decoder.decoder_layers.0.weight" in state  # NeMo's CTC models keep the head under `decoder`
    loaded = load_fastconformer(path)
    assert loaded.model.decoders == ("ctc",)


def _write_variant(tmp_path, tokenizer, edit_config=None, edit_state=None, drop_member=None):
    model = tiny_model()
    path = tmp_path / "good.nemo"
    save_fastconformer(path, model, tokenizer)
    archive = read_nemo(path)
    cfg, state = archive.config, dict(archive.state_dict)
    if edit_config:
        edit_config(cfg)
    if edit_state:
        edit_state(state)
    out = tmp_path / "variant.nemo"
    artifacts = {"tokenizer.model_path": tokenizer.model_proto}
    if drop_member == "tokenizer":
        artifacts = {}
        cfg["tokenizer"]["model_path"] = "nemo:missing_tokenizer.model"
    write_nemo(out, cfg, state, artifacts)
    return out


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["encoder"].update(causal_downsampling=False), "not a cache-aware streaming FastConformer"),
    (lambda c: c["encoder"].update(conv_context_size=[4, 4]), "only causal convolutions stream"),
    (lambda c: c["encoder"].update(att_context_size=[-1, -1]), "unlimited left context"),
    (lambda c: c["preprocessor"].update(normalize="per_feature"), "needs the whole utterance"),
    (lambda c: c.update(target="nemo.collections.asr.models.EncDecMultiTaskModel"), "is not a BPE FastConformer"),
    (lambda c: c.pop("encoder"), "has no 'encoder' section"),
])
def test_not_a_cache_aware_fastconformer(tmp_path, tokenizer, edit, message):
    path = _write_variant(tmp_path, tokenizer, edit_config=edit)
    with pytest.raises(ModelConfigError, match=message):
        load_fastconformer(path)


def test_leftover_and_missing_weights_are_named(tmp_path, tokenizer):
    def edit(state):
        state["encoder.extra_adapter.weight"] = torch.zeros(3)
        del state["joint.enc.bias"]
    path = _write_variant(tmp_path, tokenizer, edit_state=edit)
    with pytest.raises(NemoFormatError, match=r"missing: joint\.enc\.bias.*not used: encoder\.extra_adapter\.weight"):
        load_fastconformer(path)


def test_wrong_shape_is_reported(tmp_path, tokenizer):
    def edit(state):
        state["joint.enc.weight"] = torch.zeros(5, 5)
    with pytest.raises(NemoFormatError, match="do not fit"):
        load_fastconformer(_write_variant(tmp_path, tokenizer, edit_state=edit))


def test_missing_tokenizer_artifact(tmp_path, tokenizer):
    with pytest.raises(NemoFormatError, match="missing_tokenizer.model.*not in the archive"):
        load_fastconformer(_write_variant(tmp_path, tokenizer, drop_member="tokenizer"))


def test_missing_file_and_corrupt_archives(tmp_path, tokenizer):
    with pytest.raises(NemoFormatError, match="no such file"):
        load_fastconformer(tmp_path / "nope.nemo")
    junk = tmp_path / "junk.nemo"
    junk.write_bytes(b"this is not a tar archive at all" * 100)
    with pytest.raises(NemoFormatError, match="not a readable .nemo archive"):
        load_fastconformer(junk)
    good = tmp_path / "good.nemo"
    save_fastconformer(good, tiny_model(), tokenizer)
    truncated = tmp_path / "truncated.nemo"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(NemoFormatError):
        load_fastconformer(truncated)
    gz = tmp_path / "badgz.nemo"
    gz.write_bytes(gzip.compress(b"not a tar inside"))
    with pytest.raises(NemoFormatError, match="not a readable .nemo archive"):
        load_fastconformer(gz)


def test_archive_without_weights(tmp_path):
    path = tmp_path / "noweights.nemo"
    with tarfile.open(path, "w:") as tar:
        data = yaml.safe_dump({"target": "x"}).encode()
        info = tarfile.TarInfo("./model_config.yaml")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(NemoFormatError, match="has no model_weights.ckpt"):
        load_fastconformer(path)


def test_weights_load_without_pickled_code(tmp_path):
    """A checkpoint whose weights file carries arbitrary pickled objects is refused."""
    path = tmp_path / "evil.nemo"
    cfg = nemo_config(tiny_model().spec)
    buf = io.BytesIO()
    torch.save({"encoder.x": torch.zeros(1), "evil": print}, buf)
    with tarfile.open(path, "w:") as tar:
        for name, data in (("./model_config.yaml", yaml.safe_dump(cfg).encode()),
                           ("./model_weights.ckpt", buf.getvalue())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(NemoFormatError, match="could not be loaded"):
        load_fastconformer(path)


def test_saved_position_table_of_older_nemo_is_accepted(tmp_path, tokenizer):
    """NeMo < 1.x stored encoder.pos_enc.pe; it is derived, so it is checked and dropped."""
    model = tiny_model()
    table = model.encoder.pos_enc._table(300)
    good = _write_variant(tmp_path, tokenizer, edit_state=lambda s: s.update({"encoder.pos_enc.pe": table}))
    load_fastconformer(good)
    bad = _write_variant(tmp_path, tokenizer, edit_state=lambda s: s.update({"encoder.pos_enc.pe": table + 1}))
    with pytest.raises(NemoFormatError, match="pos_enc.pe differs"):
        load_fastconformer(bad)
