// The streaming page: one WebSocket to /ws; JSON events and binary frames (see serving/app.py).
"use strict";

const $ = (id) => document.getElementById(id);
const HEADER_BYTES = 12; // run, frame index, chunk index: big-endian uint32 each
const FPS_WINDOW_MS = 1000;

const state = {
  ws: null, hello: null, kind: "none", label: 0, mime: "image/jpeg",
  active: false, run: null, numFrames: 0, numChunks: 0, clickedAt: 0,
  firstFrameAt: null, lastIndex: -1, shown: 0, shownTimes: [],
  modelFrames: 0, modelSeconds: 0, savable: false,
};
// Read by scripts/browser_check.py.
window.streamStats = { ttffMs: null, fps: 0, modelFps: 0, framesShown: 0, done: null };

const canvas = $("screen");
const ctx = canvas.getContext("2d");

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function setActive(active) {
  state.active = active;
  $("start").disabled = active || !state.hello;
  $("stop").disabled = !active;
  $("apply-prompt").disabled = !active;
  $("save").disabled = !state.savable;
}

function send(msg) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(msg));
}

function fmtBytes(n) {
  if (n >= 1 << 20) return `${(n / (1 << 20)).toFixed(2)} MiB`;
  if (n >= 1 << 10) return `${(n / (1 << 10)).toFixed(1)} KiB`;
  return `${n} B`;
}

function pickLabel(d) {
  state.label = d;
  for (const b of $("digits").children) b.setAttribute("aria-checked", String(b.dataset.d == d));
  if (state.active) send({ type: "condition", label: d });
}

function setUnitLimits() {
  const l = state.hello.limits;
  const seconds = $("unit").value === "seconds";
  $("length").max = seconds ? l.max_seconds : l.max_frames;
  $("length").step = seconds ? "any" : "1";
}

function onHello(m) {
  state.hello = m;
  state.kind = m.model.condition.kind;
  state.mime = m.image_format === "png" ? "image/png" : "image/jpeg";
  const [h, w] = m.model.frame_hw;
  const scale = Math.max(1, Math.floor(320 / Math.max(h, w)));
  canvas.width = w * scale;
  canvas.height = h * scale;
  ctx.imageSmoothingEnabled = false;
  const bits = [`${h}×${w} frames`, `${m.model.frames_per_chunk} frames per chunk`];
  if (m.model.step !== undefined) bits.unshift(`checkpoint step ${m.model.step}`);
  if (m.model.name) bits.unshift(m.model.name);
  $("model-info").textContent = bits.join(" · ");
  if (state.kind === "label") {
    $("label-box").hidden = false;
    for (let d = 0; d < m.model.condition.num_classes; d++) {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = String(d);
      b.dataset.d = String(d);
      b.setAttribute("role", "radio");
      b.addEventListener("click", () => pickLabel(d));
      $("digits").appendChild(b);
    }
    pickLabel(m.defaults.label ?? 0);
  } else if (state.kind === "prompt") {
    $("prompt-box").hidden = false;
    $("prompt").maxLength = m.limits.max_prompt_chars;
  }
  $("seed").max = m.limits.max_seed;
  if (m.defaults.seed !== undefined) $("seed").value = m.defaults.seed;
  if (m.defaults.frames !== undefined) $("length").value = m.defaults.frames;
  setUnitLimits();
  setStatus("ready");
  setActive(false);
}

function start() {
  const msg = { type: "start", seed: Number($("seed").value) };
  msg[$("unit").value] = Number($("length").value);
  if (state.kind === "label") msg.label = state.label;
  if (state.kind === "prompt") msg.prompt = $("prompt").value;
  state.clickedAt = performance.now();  // time to first frame counts from the click
  setStatus("starting…");
  send(msg);
}

function resetStats() {
  Object.assign(state, { firstFrameAt: null, lastIndex: -1, shown: 0, shownTimes: [],
                         modelFrames: 0, modelSeconds: 0 });
  Object.assign(window.streamStats, { ttffMs: null, fps: 0, modelFps: 0, framesShown: 0,
                                      done: null });
  for (const id of ["fps", "model-fps", "chunk", "carry", "ttff"]) $(id).textContent = "–";
  $("dropped").textContent = "0";
}

function onEvent(m) {
  switch (m.type) {
    case "hello": onHello(m); break;
    case "queued":
      setStatus(`waiting: place ${m.position} in the queue`);
      setActive(true);
      break;
    case "refused": setStatus(m.message, true); setActive(false); break;
    case "started":
      resetStats();
      state.run = m.run;
      state.numFrames = m.num_frames;
      state.numChunks = m.num_chunks;
      $("frames").textContent = `0 / ${m.num_frames}`;
      setStatus(`generating ${m.num_frames} frames in ${m.num_chunks} chunks (seed ${m.seed})`);
      setActive(true);
      break;
    case "condition":
      setStatus(`switched to ${state.kind === "label" ? "digit " + m.value : "the new prompt"} ` +
                `at chunk ${m.chunk + 1}`);
      break;
    case "chunk":
      state.modelFrames += m.frames;
      state.modelSeconds += m.chunk_seconds;
      window.streamStats.modelFps = state.modelFrames / Math.max(state.modelSeconds, 1e-9);
      $("model-fps").textContent = window.streamStats.modelFps.toFixed(1);
      $("chunk").textContent = `${m.chunk + 1} / ${state.numChunks}`;
      $("carry").textContent = fmtBytes(m.carry_bytes);
      $("dropped").textContent = String(m.dropped);
      break;
    case "done": {
      state.savable = m.frames > 0;
      setActive(false);
      window.streamStats.done = m;
      $("dropped").textContent = String(m.dropped);
      const what = { finished: "finished", stopped: "stopped", "time limit": "stopped at the time limit",
                     error: "failed", disconnected: "ended" }[m.reason] || m.reason;
      if (m.reason !== "error") setStatus(`${what}: ${m.frames} frames in ${m.seconds.toFixed(1)} s`);
      break;
    }
    case "saved":
      $("saved").hidden = false;
      $("saved").textContent = `saved ${m.frames} frames to ${m.path}`;
      break;
    case "error": setStatus(m.message, true); break;
  }
}

function frameShown(index) {
  const now = performance.now();
  if (state.firstFrameAt === null) {
    state.firstFrameAt = now;
    window.streamStats.ttffMs = now - state.clickedAt;
    $("ttff").textContent = `${window.streamStats.ttffMs.toFixed(0)} ms`;
  }
  state.shown += 1;
  state.shownTimes.push(now);
  while (state.shownTimes.length > 2 && now - state.shownTimes[0] > FPS_WINDOW_MS) {
    state.shownTimes.shift();
  }
  const span = now - state.shownTimes[0];
  if (span > 0) window.streamStats.fps = (state.shownTimes.length - 1) * 1000 / span;
  window.streamStats.framesShown = state.shown;
  $("fps").textContent = window.streamStats.fps.toFixed(1);
  $("frames").textContent = `${index + 1} / ${state.numFrames}`;
}

// Frames decode one after another, so they are drawn in the order they arrived.
let drawing = Promise.resolve();

function onFrame(buf) {
  const dv = new DataView(buf);
  const run = dv.getUint32(0), index = dv.getUint32(4);
  if (run !== state.run) return;  // a frame of an earlier run still in flight
  const blob = new Blob([buf.slice(HEADER_BYTES)], { type: state.mime });
  drawing = drawing.then(async () => {
    const bmp = await createImageBitmap(blob);
    if (run === state.run && index > state.lastIndex) {
      state.lastIndex = index;
      ctx.drawImage(bmp, 0, 0, canvas.width, canvas.height);
      frameShown(index);
    }
    bmp.close();
  }).catch((e) => setStatus(`a frame could not be shown: ${e}`, true));
}

function connect() {
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  ws.onmessage = (ev) => (typeof ev.data === "string" ? onEvent(JSON.parse(ev.data)) : onFrame(ev.data));
  ws.onclose = () => {
    state.hello = null;
    setActive(false);
    setStatus("disconnected from the server: reload the page", true);
  };
  state.ws = ws;
}

$("start").addEventListener("click", start);
$("stop").addEventListener("click", () => send({ type: "stop" }));
$("save").addEventListener("click", () => send({ type: "save" }));
$("apply-prompt").addEventListener("click", () => send({ type: "condition", prompt: $("prompt").value }));
$("unit").addEventListener("change", setUnitLimits);
connect();
