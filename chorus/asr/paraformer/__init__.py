"""FunASR's streaming Paraformer (SANM encoder, CIF predictor, SANM decoder) as a chorus model family.

  * loader.py    - read / write a FunASR model directory (config.yaml, model.pt, tokens.json, am.mvn);
  * frontend.py  - WavFrontendOnline: kaldi fbank, LFR 7/6 and CMVN, fed pieces of any size;
  * model.py     - the encoder, predictor and decoder with FunASR's state_dict names;
  * streaming.py - per-stream state in a chorus.cache SlotPool and the batched chunk step.
"""
