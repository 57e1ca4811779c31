// AudioWorklet processor: microphone samples (float32, the AudioContext's rate) -> 16-bit PCM frames.
//
// The node is created with channelCount 1 / channelCountMode "explicit", so the graph has already
// downmixed the input to mono.  Samples are collected into frames of `frameSamples` (about 20-50 ms),
// converted to little-endian int16 (pcm_s16le) and posted to the page as transferable ArrayBuffers.
// The page sends each one as a binary WebSocket frame.
//
// Messages from the page: {type: "flush"} posts the partly filled frame (if any), then {type: "flushed"},
// so that the last few milliseconds before "stop" are not lost.

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.frameSamples = Math.max(128, Math.round(opts.frameSamples || sampleRate / 25));
    this.frame = new Int16Array(this.frameSamples);
    this.fill = 0;
    this.running = true;
    this.port.onmessage = (event) => {
      const msg = event.data || {};
      if (msg.type === "flush") {
        this.post(this.fill);
        this.port.postMessage({ type: "flushed" });
      } else if (msg.type === "close") {
        this.running = false;
      }
    };
  }

  post(count) {
    if (count <= 0) return;
    const out = this.frame.slice(0, count);  // a copy the page owns
    this.port.postMessage({ type: "audio", pcm: out.buffer }, [out.buffer]);
    this.fill = 0;
  }

  process(inputs) {
    const input = inputs[0];
    if (input && input.length > 0) {
      const samples = input[0];  // mono (downmixed by the graph)
      for (let i = 0; i < samples.length; i++) {
        // as chorus.codecs.encode("pcm_s16le"): scale by 32768, round, clip to the int16 range
        // (an Int16Array stores NaN as 0 but wraps out-of-range values, hence the clip)
        const v = Math.round(samples[i] * 32768);
        this.frame[this.fill++] = v > 32767 ? 32767 : v < -32768 ? -32768 : v;
        if (this.fill === this.frameSamples) this.post(this.fill);
      }
    }
    return this.running;
  }
}

registerProcessor("chorus-capture", CaptureProcessor);
