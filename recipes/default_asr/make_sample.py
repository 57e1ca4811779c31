"""Make the bundled sample: one sentence spoken by the held-out voice mb-us2 (never in training).

    python recipes/default_asr/make_sample.py   # writes chorus/samples/held_out_voice.{flac,txt}

The sentence was fixed before the model was trained (it is not picked for the model's sake);
it is the line of ../shared/data/samples/jfk.flac, so the same words can be heard from a
real voice too.
"""
from __future__ import annotations

import sys
from pathlib import Path

import soundfile as sf

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import voices  # noqa: E402

SENTENCE = ("And so, my fellow Americans, ask not what your country can do for you; "
            "ask what you can do for your country.")


def main() -> None:
    from chorus.asr.textnorm import normalize_text

    out = HERE.parents[1] / "chorus" / "samples"
    out.mkdir(parents=True, exist_ok=True)
    voice = voices.test_voices()["mb-us2"]
    assert voice.held_out
    audio, rate = voice.synthesize(normalize_text(SENTENCE, keep_punctuation=True))
    sf.write(out / "held_out_voice.flac", audio, rate, subtype="PCM_16")
    (out / "held_out_voice.txt").write_text(normalize_text(SENTENCE) + "\n")
    print(f"wrote {out / 'held_out_voice.flac'} ({len(audio) / rate:.2f} s, voice {voice.name})")


if __name__ == "__main__":
    main()
