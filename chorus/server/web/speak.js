// chorus browser demo, "speak" panel: text -> WebSocket /tts (chorus.tts.v1, docs/protocol.md) -> Web Audio.
// The page asks the server for audio at the AudioContext's own rate (pcm_f32le), so the browser plays it
// unchanged; each chunk is scheduled right after the previous one (back to back), as soon as it arrives.
//
// For tests and scripts the panel's state is on `window.chorusSpeak` (state, ready, voices, chunks, samples,
// scheduled, scheduledSeconds, late, marks, error, closeCode, done), mirrored in #speak-status.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const ui = { text: $("speak-text"), voice: $("voice"), speak: $("speak"), cancel: $("speak-cancel"),
               status: $("speak-status"), spoken: $("spoken") };
  const params = new URLSearchParams(location.search);
  const token = params.get("token");

  const sp = window.chorusSpeak = {
    state: "idle",        // idle | starting | speaking | done | error
    voices: [], ready: null, done: null, error: null, closeCode: null,
    chunks: 0,            // audio frames received
    samples: 0,           // samples received
    scheduled: 0,         // chunks scheduled on the AudioContext
    scheduledSeconds: 0,  // their total length
    late: 0,              // chunks that arrived after the previous one had finished playing (a gap)
    marks: [],            // the `audio` headers, in order
    contextRate: null, contextState: null,
    speak: (text) => speak(text),
  };

  let ws = null, ctx = null, nextTime = 0, header = null;

  function setState(state, text, isError = false) {
    sp.state = state;
    ui.status.textContent = text;
    ui.status.classList.toggle("error", isError);
    const busy = state === "starting" || state === "speaking";
    ui.speak.disabled = busy || sp.voices.length === 0;
    ui.cancel.disabled = !busy;
  }

  async function loadVoices() {
    let list = [];
    try {
      const resp = await fetch(new URL("models", location.href), { cache: "no-store" });
      if (resp.ok) list = await resp.json();
    } catch (e) { /* the transcription panel reports it */ }
    // voices that speak text (a CosyVoice 2 voice takes speech tokens from an LLM: not this panel's)
    sp.voices = (Array.isArray(list) ? list : []).filter((m) => m.kind === "tts" && m.input !== "speech_tokens");
    ui.voice.replaceChildren(...sp.voices.map((v) => {
      const o = document.createElement("option");
      o.value = v.name;
      o.textContent = `${v.name} (${v.family}, ${v.sample_rate} Hz)`;
      return o;
    }));
    const def = sp.voices.find((v) => v.default);
    if (def) ui.voice.value = def.name;
    ui.voice.disabled = sp.voices.length === 0;
    setState("idle", sp.voices.length ? "type some text and press Speak" : "the server offers no voices");
  }

  function audioContext() {
    if (!ctx) ctx = new AudioContext();
    if (ctx.state === "suspended") ctx.resume().catch(() => {});
    sp.contextRate = ctx.sampleRate;
    return ctx;
  }

  function play(samples) {
    const c = audioContext();
    sp.contextState = c.state;
    if (!samples.length) return;
    const buffer = c.createBuffer(1, samples.length, sp.ready.sample_rate);
    buffer.copyToChannel(samples, 0);
    const source = c.createBufferSource();
    source.buffer = buffer;
    source.connect(c.destination);
    const now = c.currentTime;
    if (nextTime < now + 0.02) {  // nothing queued: start shortly (the first chunk, or after a gap)
      if (sp.scheduled > 0) sp.late += 1;
      nextTime = now + 0.05;
    }
    source.start(nextTime);
    nextTime += buffer.duration;
    sp.scheduled += 1;
    sp.scheduledSeconds += buffer.duration;
  }

  function addSpoken(mark) {
    const row = document.createElement("div");
    row.className = "spoken";
    row.textContent = mark.text;
    row.dataset.segment = mark.segment;
    ui.spoken.append(row);
  }

  function socketUrl() {
    const url = new URL("tts", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    url.search = "";
    if (token) url.searchParams.set("token", token);
    return url;
  }

  function speak(text) {
    text = text === undefined ? ui.text.value : text;
    if (!text.trim() || sp.state === "starting" || sp.state === "speaking") return;
    const c = audioContext();  // created in the click: browsers allow audio after a gesture
    Object.assign(sp, { ready: null, done: null, error: null, closeCode: null, chunks: 0, samples: 0,
                        scheduled: 0, scheduledSeconds: 0, late: 0, marks: [] });
    ui.spoken.replaceChildren();
    nextTime = 0;
    header = null;
    setState("starting", "connecting…");
    const socket = ws = new WebSocket(socketUrl());
    socket.binaryType = "arraybuffer";
    socket.onopen = () => {
      const start = { type: "start", sample_rate: c.sampleRate, encoding: "pcm_f32le" };
      if (ui.voice.value) start.voice = ui.voice.value;
      socket.send(JSON.stringify(start));
      socket.send(JSON.stringify({ type: "text", text }));
      socket.send(JSON.stringify({ type: "stop" }));
    };
    socket.onmessage = (event) => {
      if (socket !== ws) return;
      if (typeof event.data !== "string") {  // the audio of the last header
        const samples = new Float32Array(event.data);
        sp.chunks += 1;
        sp.samples += samples.length;
        play(samples);
        if (header) addSpoken(header);
        header = null;
        return;
      }
      let msg;
      try { msg = JSON.parse(event.data); } catch (e) { return; }
      if (msg.type === "ready") {
        sp.ready = msg;
        setState("speaking", `speaking with ${msg.voice} (${msg.family}) at ${msg.sample_rate} Hz`);
      } else if (msg.type === "audio") {
        header = msg;
        sp.marks.push(msg);
      } else if (msg.type === "done") {
        sp.done = msg;
      } else if (msg.type === "error") {
        sp.error = { code: msg.code, message: msg.message };
        setState("error", `error ${msg.code}: ${msg.message}`, true);
      }
    };
    socket.onclose = (event) => {
      if (socket !== ws) return;
      sp.closeCode = event.code;
      if (sp.state === "error") return;
      if (sp.done) setState("done", `done: ${sp.done.segments} sentences, ${sp.done.seconds.toFixed(2)} s of audio`);
      else setState("error", `connection closed (${event.code}) ${event.reason || ""}`, true);
    };
  }

  function cancel() {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "cancel" }));
    if (ws) ws.close(1000, "cancelled");
    ws = null;
    if (ctx) { ctx.close().catch(() => {}); ctx = null; }  // stops what is scheduled
    setState("idle", "cancelled");
  }

  ui.speak.addEventListener("click", () => speak());
  ui.cancel.addEventListener("click", () => cancel());
  loadVoices();
})();
