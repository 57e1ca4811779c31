"""OpenAI Whisper (and CarelessWhisper's causal fine-tunes): model, loaders, tokenizer, greedy decoding."""
