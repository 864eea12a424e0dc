// The demo page: draws the chosen source on the input canvas, sends it to the server as JPEG over
// the WebSocket, and shows what comes back. The protocol is described in fastdiff/demo/server.py.
"use strict";

const $ = (id) => document.getElementById(id);
const SEND_INTERVAL_MS = 33;   // at most ~30 frames/s leave the page
const CAPTURE_SIDE = 128;      // frames are sent at this size; the server fits them to the model's
const EDIT_DELAY_MS = 120;     // typing sends one update per pause, not one per key

const page = {
  ws: null,
  running: false,
  run: 0,               // counts starts, so that a frame captured before a restart is not sent after it
  defaults: null,       // from the server's "ready" message
  lag: 1,               // calls between a frame going in and its output coming out
  sent: 0,              // frames sent since connecting (the server numbers them the same way)
  firstIndex: 0,        // the index of this run's first frame
  answered: 0,          // this run's frames answered by an output, a drop or an error
  awaitingStart: false, // outputs before the reply to "start" belong to the previous run
  header: null,         // the "output" message whose image is the next binary message
  stepsEdited: false,
  camera: null,         // the webcam's MediaStream while in use
  shapeTime: 0,
  reconnects: 0,        // tries since the connection was lost (a server behind several replicas lives on)
  resume: false,        // start again once reconnected: the stream was running when the connection went
};
const RECONNECT_MAX_MS = 10000;

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function send(message) {
  if (page.ws && page.ws.readyState === WebSocket.OPEN) page.ws.send(JSON.stringify(message));
}

function mode() {
  return $("source").value === "txt2img" ? "txt2img" : "img2img";
}

function settingsFromControls() {
  const settings = {
    mode: mode(),
    prompt: $("prompt").value,
    negative_prompt: $("negative-prompt").value || null,
    guidance_scale: Number($("guidance").value),
  };
  if (page.stepsEdited) {
    const steps = $("steps").value.split(",").map((s) => Number(s.trim()));
    if (steps.some((s) => !Number.isInteger(s))) {
      status("steps must be comma-separated integers such as 32,45", true);
    } else {
      settings.steps = steps;
    }
  }
  return settings;
}

// --- connection -----------------------------------------------------------------------------------
function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/ws`);
  ws.binaryType = "blob";
  ws.onmessage = (event) => (typeof event.data === "string" ? onMessage(JSON.parse(event.data)) : showOutput(event.data));
  ws.onclose = (event) => {
    const wasRunning = page.running;
    const lost = wasRunning ? Math.max(0, page.sent - page.firstIndex - page.answered) : 0;
    setRunning(false);
    $("toggle").disabled = true;
    // Lost, not closed by us: another server (replica) takes over once we reconnect.
    page.resume = page.resume || wasRunning;
    const wait = Math.min(RECONNECT_MAX_MS, 500 * 2 ** page.reconnects);
    page.reconnects += 1;
    const why = `${event.code}${event.reason ? ": " + event.reason : ""}`;
    status(`connection lost (${why})${lost ? `; ${lost} frame(s) in flight were lost` : ""}; reconnecting…`, true);
    setTimeout(connect, wait);
  };
  page.ws = ws;
}

function onMessage(message) {
  switch (message.type) {
    case "ready":
      page.defaults = message;
      $("prompt").value = message.defaults.prompt;
      $("guidance").value = message.defaults.guidance_scale;
      $("guidance-value").textContent = Number(message.defaults.guidance_scale).toFixed(1);
      $("steps").value = message.default_steps[mode()].join(",");
      $("toggle").disabled = false;
      page.reconnects = 0;
      if (page.resume) {   // reconnected after a lost connection: carry on where we were
        page.resume = false;
        page.sent = 0;
        status(`reconnected${message.replica ? " to " + message.replica : ""}`);
        start();
      } else {
        status("connected: press Start");
      }
      break;
    case "started":
    case "updated":
      if (message.type === "started") page.awaitingStart = false;
      page.lag = message.lag;
      $("steps").value = message.settings.steps.join(",");
      status(`${message.settings.mode}, ${message.width}×${message.height}, ${message.settings.steps.length} step(s)`);
      break;
    case "output":
      page.header = message;
      // txt2img outputs are numbered by generation, not by frame
      if (!page.awaitingStart && mode() === "img2img" && ofThisRun(message.index)) page.answered += 1;
      showStats(message.stats);
      break;
    case "dropped":
      if (ofThisRun(message.index)) page.answered += 1;
      $("dropped").textContent = message.dropped;
      break;
    case "error":
      if (ofThisRun(message.index)) page.answered += 1;
      status(`error: ${message.message}`, true);
      break;
    case "stopped":
      status("stopped");
      break;
  }
}

function ofThisRun(index) {
  return index !== null && index >= page.firstIndex;
}

function showOutput(blob) {
  const image = $("output");
  const previous = image.src;
  image.src = URL.createObjectURL(blob);
  if (previous.startsWith("blob:")) URL.revokeObjectURL(previous);
  if (page.header) image.title = `#${page.header.index}, ${page.header.latency_ms} ms after its input arrived`;
  page.header = null;
}

function showStats(stats) {
  const ms = (value) => (value === null ? "–" : value.toFixed(1));
  $("fps").textContent = stats.frames_per_s.toFixed(1);
  $("p50").textContent = ms(stats.latency_p50_ms);
  $("p95").textContent = ms(stats.latency_p95_ms);
  $("outputs").textContent = stats.outputs;
  $("dropped").textContent = stats.dropped;
}

// --- sources ----------------------------------------------------------------------------------------
async function startCamera() {
  if (!navigator.mediaDevices) throw new Error("this page has no camera access (it needs https or localhost)");
  page.camera = await navigator.mediaDevices.getUserMedia({ video: { width: 320, height: 240 }, audio: false });
  $("camera").srcObject = page.camera;
  await $("camera").play();
}

function stopCamera() {
  if (page.camera) page.camera.getTracks().forEach((track) => track.stop());
  page.camera = null;
}

function drawCamera(ctx, side) {
  const video = $("camera");
  const crop = Math.min(video.videoWidth, video.videoHeight);
  if (!crop) return false;
  ctx.drawImage(video, (video.videoWidth - crop) / 2, (video.videoHeight - crop) / 2, crop, crop, 0, 0, side, side);
  return true;
}

// A shape crossing a dark background and changing colour, like fastdiff.shapes.moving_shapes_clip.
function drawShapes(ctx, side) {
  const t = (page.shapeTime += 1) / 90;
  const phase = (t % 2 < 1) ? t % 1 : 2 - (t % 2);          // back and forth
  const kind = Math.floor(t / 2) % 3;                        // circle, square, triangle in turn
  const r = side * 0.16, x = r + phase * (side - 2 * r), y = side / 2 + Math.sin(t * 2) * side * 0.2;
  ctx.fillStyle = "#1e2a5a";
  ctx.fillRect(0, 0, side, side);
  ctx.fillStyle = `hsl(${(t * 60) % 360}, 85%, 55%)`;
  ctx.beginPath();
  if (kind === 0) ctx.arc(x, y, r, 0, 2 * Math.PI);
  else if (kind === 1) ctx.rect(x - r, y - r, 2 * r, 2 * r);
  else { ctx.moveTo(x, y - r); ctx.lineTo(x + r, y + r); ctx.lineTo(x - r, y + r); ctx.closePath(); }
  ctx.fill();
  return true;
}

function drawPromptOnly(ctx, side) {
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, side, side);
  ctx.fillStyle = "#9aa0ad";
  ctx.font = `${side / 16}px system-ui, sans-serif`;
  ctx.textAlign = "center";
  ctx.fillText("txt2img: no input image,", side / 2, side / 2 - side / 24);
  ctx.fillText("the prompt is the input", side / 2, side / 2 + side / 24);
  return false;
}

// --- the frame loop ---------------------------------------------------------------------------------
const capture = document.createElement("canvas");
capture.width = capture.height = CAPTURE_SIDE;
let capturing = false;

function tick(run) {
  if (!page.running || run !== page.run) return;  // stopped, or a newer run has its own loop
  const canvas = $("input");
  const ctx = canvas.getContext("2d");
  const draw = { webcam: drawCamera, shapes: drawShapes, txt2img: drawPromptOnly }[$("source").value];
  const drawn = draw(ctx, canvas.width);
  // The stream holds `lag` frames; one more keeps the model busy. Sending more would only make
  // frames wait (latency) or be dropped as stale by the server.
  const inFlight = page.sent - page.firstIndex - page.answered;
  if (drawn && mode() === "img2img" && !capturing && inFlight <= page.lag) {
    capturing = true;
    capture.getContext("2d").drawImage(canvas, 0, 0, CAPTURE_SIDE, CAPTURE_SIDE);
    capture.toBlob((blob) => {
      capturing = false;
      // Encoding is asynchronous: a frame captured before a restart belongs to the old run.
      if (!blob || run !== page.run || !page.running || page.ws.readyState !== WebSocket.OPEN) return;
      page.ws.send(blob);
      page.sent += 1;
    }, "image/jpeg", 0.85);
  }
  setTimeout(() => tick(run), SEND_INTERVAL_MS);
}

function setRunning(running) {
  page.running = running;
  $("toggle").textContent = running ? "Stop" : "Start";
  $("toggle").classList.toggle("running", running);
}

async function start() {
  try {
    if ($("source").value === "webcam") await startCamera();
  } catch (error) {
    status(`camera unavailable: ${error.message}; try the moving-shapes source`, true);
    return;
  }
  page.run += 1;
  page.firstIndex = page.sent;
  page.answered = 0;
  page.awaitingStart = true;
  send({ type: "start", ...settingsFromControls() });
  setRunning(true);
  tick(page.run);
}

function stop() {
  setRunning(false);
  stopCamera();
  send({ type: "stop" });
}

// --- controls ---------------------------------------------------------------------------------------
let editTimer = null;
function sendUpdateSoon(fields) {
  if (!page.running) return;
  clearTimeout(editTimer);
  editTimer = setTimeout(() => send({ type: "update", ...fields() }), EDIT_DELAY_MS);
}

$("toggle").addEventListener("click", () => (page.running ? stop() : start()));
$("prompt").addEventListener("input", () => sendUpdateSoon(() => ({ prompt: $("prompt").value })));
$("negative-prompt").addEventListener("input",
  () => sendUpdateSoon(() => ({ negative_prompt: $("negative-prompt").value || null })));
$("guidance").addEventListener("input", () => {
  $("guidance-value").textContent = Number($("guidance").value).toFixed(1);
  sendUpdateSoon(() => ({ guidance_scale: Number($("guidance").value) }));
});
$("steps").addEventListener("change", () => {
  page.stepsEdited = true;
  const { steps } = settingsFromControls();
  if (steps && page.running) send({ type: "update", steps });
});
$("source").addEventListener("change", async () => {
  page.stepsEdited = false;
  if (page.defaults) $("steps").value = page.defaults.default_steps[mode()].join(",");
  if (page.running) {  // a new source restarts the stream in its mode
    stop();
    await start();
  }
});

connect();
