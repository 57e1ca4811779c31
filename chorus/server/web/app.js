// chorus browser demo: microphone -> AudioWorklet (pcm_s16le at the AudioContext's rate) -> WebSocket /asr
// -> partial / final results on the page.  Plain JavaScript, no build step, nothing loaded from elsewhere.
// The protocol is docs/protocol.md (chorus.asr.v1).
//
// For tests and scripts the page state is on `window.chorusDemo` (state, ready, finals, partial, error,
// closeCode, framesSent, ...), mirrored in the DOM: body[data-state], #status, #finals, #partial.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const ui = {
    model: $("model"), decoder: $("decoder"), lookahead: $("lookahead"), start: $("start"), stop: $("stop"),
    level: $("level"), status: $("status"), info: $("info"), finals: $("finals"), partial: $("partial"),
    transcript: $("transcript"), options: $("model-options"),
  };
  const params = new URLSearchParams(location.search);
  const token = params.get("token");
  const frameMs = Math.min(100, Math.max(20, Number(params.get("frame_ms")) || 40));

  // Close codes of the protocol (docs/protocol.md) and the browser's own.
  const CLOSE_MEANING = {
    1000: "stopped", 1001: "the server is going away", 1003: "unsupported data", 1006: "connection lost",
    1007: "invalid data", 1008: "policy violation", 1009: "frame too large", 1011: "server error",
    1013: "server busy, try again later",
  };

  const demo = window.chorusDemo = {
    state: "idle",          // idle | starting | listening | stopping | stopped | error
    models: [],
    ready: null,            // the server's `ready` message
    finals: [],             // every `final` message, in order
    partial: "",            // text of the utterance in progress
    partials: 0,            // `partial` messages received
    error: null,            // {code, message} from an `error` message, or a client-side problem
    closeCode: null, closeReason: "",
    sampleRate: null, framesSent: 0, bytesSent: 0,
    start: () => start(), stop: () => stop(),
  };

  let ws = null, audio = null, keepaliveTimer = null, lastSend = 0;
  let pending = [];  // audio captured while the WebSocket is still connecting (sent right after `start`)

  // ---------------------------------------------------------------------------------------------- UI
  function setState(state, text, isError = false) {
    demo.state = state;
    document.body.dataset.state = state;
    if (text !== undefined) {
      ui.status.textContent = text;
      ui.status.classList.toggle("error", isError);
    }
    const busy = state === "starting" || state === "listening" || state === "stopping";
    ui.start.disabled = busy || demo.models.length === 0;
    ui.stop.disabled = !(state === "starting" || state === "listening");
    for (const sel of [ui.model, ui.decoder, ui.lookahead, ...optionSelects()]) {
      sel.disabled = busy || demo.models.length === 0;
    }
  }

  function fail(text, code = "client") {
    if (!demo.error) demo.error = { code, message: text };
    setState("error", text, true);
  }

  function plural(n, word) { return `${n} ${word}${n === 1 ? "" : "s"}`; }

  function fmtTime(t) {
    if (typeof t !== "number" || !isFinite(t)) return "?";
    if (t < 60) return t.toFixed(2);
    const m = Math.floor(t / 60);
    return `${m}:${(t - 60 * m).toFixed(2).padStart(5, "0")}`;
  }

  function addFinal(msg) {
    demo.finals.push(msg);
    demo.partial = "";
    ui.partial.textContent = "";
    if (!msg.text) return;  // a finalize/stop final may be empty: nothing to show
    const row = document.createElement("div");
    row.className = "final";
    row.dataset.utterance = msg.utterance;
    row.dataset.reason = msg.reason || "";
    const time = document.createElement("span");
    time.className = "time";
    time.textContent = `${fmtTime(msg.start)}–${fmtTime(msg.end)}`;
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = msg.text;
    row.append(time, " ", text);
    ui.finals.append(row);
    scrollDown();
  }

  function setPartial(msg) {
    demo.partials += 1;
    demo.partial = msg.text || "";
    ui.partial.textContent = demo.partial;
    ui.partial.dataset.utterance = msg.utterance;
    scrollDown();
  }

  function scrollDown() { ui.transcript.scrollTop = ui.transcript.scrollHeight; }

  // ------------------------------------------------------------------------------------------ models
  function option(value, label) {
    const o = document.createElement("option");
    o.value = value;
    o.textContent = label;
    return o;
  }

  function optionSelects() { return [...ui.options.querySelectorAll("select")]; }

  // A model's own stream options that /models lists as a choice of values (Whisper: mode, commit, look_back;
  // its block_ms is the lookahead choice): one select each, preselected from the URL (`?mode=window`).
  function fillFamilyOptions(m) {
    ui.options.replaceChildren();
    const options = (m && m.options) || {};
    const defaults = options.default || {};
    for (const [name, values] of Object.entries(options)) {
      if (!Array.isArray(values) || name === "block_ms") continue;
      const sel = document.createElement("select");
      sel.id = `option-${name}`;
      sel.dataset.option = name;
      sel.dataset.numeric = String(values.every((v) => typeof v === "number"));
      const dflt = name in defaults ? ` (${defaults[name]})` : "";
      sel.append(option("", `default${dflt}`), ...values.map((v) => option(String(v), String(v))));
      const wanted = params.get(name);
      if (wanted && !values.map(String).includes(wanted)) sel.append(option(wanted, wanted));
      sel.value = wanted || "";
      const label = document.createElement("label");
      label.append(`${name[0].toUpperCase()}${name.slice(1).replace("_", " ")} `, sel);
      ui.options.append(label);
    }
  }

  function chosenOptions() {
    const chosen = {};
    for (const sel of optionSelects()) {
      if (sel.value) chosen[sel.dataset.option] = sel.dataset.numeric === "true" ? Number(sel.value) : sel.value;
    }
    return chosen;
  }

  // The decoder and lookahead choices of the selected model; `want` preselects (e.g. from the URL).
  function fillModelOptions(want = { decoder: "", lookahead: "" }) {
    const m = demo.models.find((x) => x.name === ui.model.value) || demo.models[0];
    ui.decoder.replaceChildren(option("", "default"));
    ui.lookahead.replaceChildren(option("", "default"));
    fillFamilyOptions(m);
    if (!m) return;
    for (const d of m.decoders || []) ui.decoder.append(option(d, d));
    for (const l of m.lookahead_ms || []) ui.lookahead.append(option(String(l), `${l} ms`));
    // a value from the URL that the model does not list is kept, so the server can say why it is refused
    for (const [sel, value, label] of [[ui.decoder, want.decoder, want.decoder],
                                       [ui.lookahead, want.lookahead, `${want.lookahead} ms`]]) {
      if (value && ![...sel.options].some((o) => o.value === value)) sel.append(option(value, label));
      sel.value = value;
    }
  }

  async function loadModels() {
    let list;
    try {
      const resp = await fetch(new URL("models", location.href), { cache: "no-store" });
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      list = await resp.json();
    } catch (err) {
      fail(`could not load the model list (GET /models): ${err.message}`);
      return false;
    }
    demo.models = (Array.isArray(list) ? list : []).filter((m) => m.kind !== "tts");  // voices: speak.js
    ui.model.replaceChildren(...demo.models.map((m) => option(m.name, `${m.name} (${m.slots} slots)`)));
    const wanted = params.get("model");
    if (wanted && !demo.models.some((m) => m.name === wanted)) ui.model.append(option(wanted, wanted));
    ui.model.value = wanted || (demo.models[0] ? demo.models[0].name : "");  // the first is the server's default
    fillModelOptions({ decoder: params.get("decoder") || "", lookahead: params.get("lookahead_ms") || "" });
    if (demo.models.length === 0) {
      fail("the server offers no models");
      return false;
    }
    setState("idle", "ready: press Start and speak");
    return true;
  }

  // ------------------------------------------------------------------------------------------- audio
  async function openAudio() {
    if (!window.isSecureContext || !navigator.mediaDevices || !window.AudioWorkletNode) {
      throw new Error("the browser allows microphone capture only on secure pages: open this page over " +
                      "https:// (e.g. behind a TLS proxy) or as http://localhost / http://127.0.0.1");
    }
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
    const ctx = new AudioContext({ latencyHint: "interactive" });
    const a = { stream, ctx, source: null, node: null, mute: null, flushed: null };
    try {
      await resumeContext(ctx);
      await ctx.audioWorklet.addModule(new URL("capture-worklet.js", location.href));
      a.source = ctx.createMediaStreamSource(stream);
      a.node = new AudioWorkletNode(ctx, "chorus-capture", {
        numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1],
        channelCount: 1, channelCountMode: "explicit", channelInterpretation: "speakers",
        processorOptions: { frameSamples: Math.round(ctx.sampleRate * frameMs / 1000) },
      });
      // Keep the node in the rendering graph (some browsers only process nodes that reach the
      // destination); a gain of 0 keeps the microphone out of the speakers.
      a.mute = ctx.createGain();
      a.mute.gain.value = 0;
      a.node.connect(a.mute).connect(ctx.destination);
      a.node.port.onmessage = (event) => onWorkletMessage(a, event.data);
    } catch (err) {
      closeAudio(a);
      throw err;
    }
    for (const track of stream.getAudioTracks()) {
      track.onended = () => { if (demo.state === "listening") stop("the microphone was disconnected"); };
    }
    return a;
  }

  async function resumeContext(ctx) {
    if (ctx.state !== "suspended") return;
    // Without a user gesture (autostart, autoplay policy) resume() may wait for one: do not hang.
    await Promise.race([ctx.resume().catch(() => {}), new Promise((r) => setTimeout(r, 1000))]);
    if (ctx.state === "suspended") {
      ui.status.textContent = "audio is paused by the browser: click anywhere on the page to start it";
      const onClick = () => ctx.resume().then(() => {
        if (ctx.state === "running") {
          document.removeEventListener("click", onClick, true);
          if (demo.state === "listening") showListening();
        }
      });
      document.addEventListener("click", onClick, true);
    }
  }

  function onWorkletMessage(a, msg) {
    if (msg.type === "flushed") {
      if (a.flushed) a.flushed();
      return;
    }
    if (msg.type !== "audio" || audio !== a) return;
    const pcm = msg.pcm;
    updateLevel(pcm);
    if (!(demo.state === "starting" || demo.state === "listening" || demo.state === "stopping")) return;
    if (ws && ws.readyState === WebSocket.OPEN) {
      sendAudio(pcm);
    } else if (!ws || ws.readyState === WebSocket.CONNECTING) {
      // the first words are often spoken while the connection is being set up: keep up to 10 s of them
      if (pending.length * frameMs < 10000) pending.push(pcm);
    }
  }

  function sendAudio(pcm) {
    ws.send(pcm);
    demo.framesSent += 1;
    demo.bytesSent += pcm.byteLength;
    lastSend = performance.now();
  }

  function updateLevel(buffer) {
    const s = new Int16Array(buffer);
    let sum = 0;
    for (let i = 0; i < s.length; i++) sum += s[i] * s[i];
    const rms = Math.sqrt(sum / Math.max(1, s.length)) / 32768;
    ui.level.value = Math.min(1, Math.sqrt(rms) * 1.5);  // a rough loudness scale
  }

  async function flushAudio(a) {
    if (!a || !a.node) return;
    await Promise.race([new Promise((resolve) => { a.flushed = resolve; a.node.port.postMessage({ type: "flush" }); }),
                        new Promise((r) => setTimeout(r, 300))]);
  }

  function closeAudio(a) {
    if (!a) return;
    try { if (a.node) { a.node.port.postMessage({ type: "close" }); a.node.disconnect(); } } catch (e) { /* gone */ }
    try { if (a.source) a.source.disconnect(); } catch (e) { /* gone */ }
    for (const t of a.stream.getTracks()) t.stop();
    if (a.ctx.state !== "closed") a.ctx.close().catch(() => {});
    if (audio === a) audio = null;
    ui.level.value = 0;
  }

  // --------------------------------------------------------------------------------------- websocket
  function socketUrl() {
    const url = new URL("asr", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    url.search = "";
    if (token) url.searchParams.set("token", token);
    return url;
  }

  function startMessage(sampleRate) {
    const msg = { type: "start", sample_rate: sampleRate, encoding: "pcm_s16le", interim_results: true };
    if (ui.model.value) msg.model = ui.model.value;
    if (ui.decoder.value) msg.decoder = ui.decoder.value;
    if (ui.lookahead.value) msg.lookahead_ms = Number(ui.lookahead.value);
    const options = chosenOptions();
    if (Object.keys(options).length) msg.options = options;
    return msg;
  }

  function showListening() {
    const r = demo.ready;
    setState("listening", audio && audio.ctx.state === "suspended"
      ? "connected, but the browser keeps audio paused: click anywhere on the page to start the microphone"
      : "listening: speak now");
    const options = Object.entries(r.options || {}).map(([k, v]) => `${k} ${v}`).join(", ");
    ui.info.textContent = `model ${r.model} · ${r.decoder} · lookahead ${r.lookahead_ms} ms ` +
      `(chunk ${r.chunk_ms} ms)${options ? ` · ${options}` : ""} · capturing ${demo.sampleRate} Hz pcm_s16le in ${frameMs} ms frames · ` +
      `stream ${r.stream_id}`;
  }

  function onMessage(event) {
    if (typeof event.data !== "string") return;  // the ASR protocol sends only text frames
    let msg;
    try { msg = JSON.parse(event.data); } catch (e) { return; }
    switch (msg.type) {
      case "ready":
        demo.ready = msg;
        if (demo.state === "starting") showListening();
        break;
      case "partial":
        setPartial(msg);
        break;
      case "final":
        addFinal(msg);
        break;
      case "error":
        demo.error = { code: msg.code, message: msg.message };
        setState("error", `error ${msg.code}: ${msg.message}`, true);
        closeAudio(audio);  // the stream is over; the close frame follows
        break;
      default:
        break;  // newer message types: ignore (protocol versioning rule)
    }
  }

  async function onClose(socket, event, opened) {
    if (ws === socket) ws = null;
    pending = [];
    clearInterval(keepaliveTimer);
    closeAudio(audio);
    demo.closeCode = event.code;
    demo.closeReason = event.reason || "";
    const meaning = CLOSE_MEANING[event.code] || "closed";
    if (demo.error && demo.error.code !== "client") {
      setState("error", `error ${demo.error.code}: ${demo.error.message} (close ${event.code})`, true);
    } else if (demo.error) {
      setState("error", `${demo.error.message} (close ${event.code})`, true);
    } else if (event.code === 1000 || (!opened && demo.state === "stopping")) {
      setState("stopped", `stopped (close ${event.code}) · ` +
               plural(demo.finals.filter((f) => f.text).length, "utterance"));
    } else if (!opened) {
      // The browser hides why a handshake failed; ask the same URL over plain HTTP to find out.
      fail(await handshakeProblem(), "connect");
    } else {
      fail(`connection closed: ${event.code} ${meaning}${event.reason ? ` (${event.reason})` : ""}`,
           `close_${event.code}`);
    }
  }

  async function handshakeProblem() {
    const url = socketUrl();
    url.protocol = location.protocol;
    try {
      const resp = await fetch(url, { cache: "no-store" });
      if (resp.status === 401) {
        return token ? "the server refused the token (HTTP 401): check ?token= in the page URL"
                     : "the server needs a token (HTTP 401): open this page with ?token=YOUR_TOKEN";
      }
      if (resp.status === 503) return "the server has too many connections (HTTP 503): try again later";
      return `could not open the WebSocket ${socketUrl().href} (the server answers HTTP ${resp.status} to a ` +
             "plain request; is this page's origin allowed by --allowed-origin?)";
    } catch (err) {
      return `could not reach the server at ${socketUrl().href}`;
    }
  }

  // ------------------------------------------------------------------------------------ start / stop
  async function start() {
    if (demo.state === "starting" || demo.state === "listening" || demo.state === "stopping") return;
    Object.assign(demo, { ready: null, error: null, closeCode: null, closeReason: "", partial: "",
                          framesSent: 0, bytesSent: 0, finals: [], partials: 0 });
    ui.finals.replaceChildren();
    ui.partial.textContent = "";
    ui.info.textContent = "";
    setState("starting", "starting the microphone…");
    let a;
    try {
      a = await openAudio();
    } catch (err) {
      const name = err && err.name;
      fail(name === "NotAllowedError" ? "microphone access was denied" :
           name === "NotFoundError" ? "no microphone found" : `microphone: ${err.message || err}`);
      return;
    }
    if (demo.state !== "starting") { closeAudio(a); return; }  // stopped meanwhile
    audio = a;
    pending = [];
    demo.sampleRate = a.ctx.sampleRate;
    a.source.connect(a.node);  // capture from now on
    ui.status.textContent = `connecting to ${socketUrl().origin}…`;

    let socket;
    try {
      socket = ws = new WebSocket(socketUrl());
    } catch (err) {
      closeAudio(a);
      fail(`could not open the WebSocket: ${err.message}`);
      return;
    }
    socket.binaryType = "arraybuffer";
    let opened = false;
    socket.onopen = () => {
      opened = true;
      socket.send(JSON.stringify(startMessage(a.ctx.sampleRate)));
      lastSend = performance.now();
      // audio may follow `start` at once (the server keeps it in order): first what was captured so far
      for (const pcm of pending) sendAudio(pcm);
      pending = [];
      keepaliveTimer = setInterval(() => {  // e.g. while the browser keeps the audio paused
        if (socket.readyState === WebSocket.OPEN && performance.now() - lastSend > 10000) {
          socket.send(JSON.stringify({ type: "keepalive" }));
          lastSend = performance.now();
        }
      }, 5000);
    };
    socket.onmessage = onMessage;
    socket.onerror = () => {};  // the close event that follows carries what there is to know
    socket.onclose = (event) => onClose(socket, event, opened);
  }

  async function stop(reason) {
    if (demo.state !== "starting" && demo.state !== "listening") return;
    const socket = ws;
    setState("stopping", reason ? `${reason}: stopping…` : "stopping: waiting for the last result…");
    const a = audio;
    if (socket && socket.readyState === WebSocket.OPEN) {
      await flushAudio(a);  // the last few ms still in the worklet
      closeAudio(a);
      socket.send(JSON.stringify({ type: "stop" }));
      // the server answers with the last `final` (after any backlog) and closes with 1000; not forever
      setTimeout(() => { if (socket.readyState !== WebSocket.CLOSED) socket.close(1000, "stop timed out"); }, 60000);
    } else {
      closeAudio(a);
      if (socket) socket.close(1000, "stopped before connecting");
      else setState("stopped", "stopped");
    }
  }

  // ---------------------------------------------------------------------------------------- wiring
  ui.model.addEventListener("change", () => fillModelOptions());
  ui.start.addEventListener("click", () => start());
  ui.stop.addEventListener("click", () => stop());
  window.addEventListener("pagehide", () => { if (ws) ws.close(1000, "page closed"); closeAudio(audio); });

  loadModels().then((ok) => {
    if (ok && /^(1|true|yes)$/i.test(params.get("autostart") || "")) start();
  });
})();
