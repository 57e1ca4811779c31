"""CosyVoice 2 token-to-wave: the flow (tokens to mel) and the HiFT vocoder (mel to audio), streamed."""
