"""Text to speech. One voice family today: Piper (`chorus.tts.piper`), used by `chorus speak`."""
