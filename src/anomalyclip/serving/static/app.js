// The inspection page: uploads images one by one (or, for a method whose images score
// each other, a dropped set together), then thresholds the returned anomaly maps on
// canvases, so moving a slider never sends anything to the server again.
"use strict";

const UPLOAD_CONCURRENCY = 2;
const BUSY_RETRIES = 4; // a busy service (503) is asked again after 1, 2, 3 s
const MASK_COLOUR = [230, 40, 40, 150];
const HEAT_ALPHA = 0.5; // the heatmap's weight over the image, as in the report's overlays
const ROBUST_SAMPLE = 200000; // map values sampled for the robust colour range
const FILLED_SHARE = 0.5; // the method's range is kept while the maps fill this much of it

const state = {
  items: [],
  nextId: 0,
  imageThreshold: 0.5,
  pixelThreshold: 2,
  defaults: { image: 0.5, pixel: 2 },
  mapRange: [0, 4],
  calibratedPixelThreshold: null,
  // one colour scale for every card, so that colours compare across them
  colourScale: { low: 0, high: 4, source: "the method's map range" },
  method: null,
  scoresSets: false,
  references: null,
  referenceCount: 0,
  // references being read: drops wait for them (scored without, they would read
  // "Normal" beside the same part scored with them, nothing telling the two apart)
  referencesReady: Promise.resolve(),
  queue: [],
  active: 0,
  redrawPending: false,
};

const $ = (selector) => document.querySelector(selector);

function formatNumber(value, digits = 3) {
  return Number(value).toFixed(digits);
}

function decodeMap(map) {
  const binary = atob(map.data);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  const view = new DataView(bytes.buffer);
  const count = map.width * map.height;
  const values = new Float32Array(count);
  const step = (map.max - map.min) / 65535;
  for (let i = 0; i < count; i++) values[i] = map.min + view.getUint16(2 * i, true) * step;
  return values;
}

function describeThreshold(value, source) {
  // without a calibrated threshold the slider starts mid-range: a choice left to the user
  return value === null ? "none calibrated: set it with the slider" : `${formatNumber(value)} (${source})`;
}

function fillMethodChoice(methods) {
  const select = $("#method");
  if (select.options.length === methods.length) return;
  select.replaceChildren(...methods.map((name) => new Option(name, name)));
  select.value = state.method;
  $("#method-choice").hidden = methods.length < 2;
}

async function loadModelInfo() {
  try {
    const response = await fetch(`/v1/model?${scoringQuery()}`);
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const info = await response.json();
    state.method = info.method;
    state.scoresSets = info.scores_sets;
    state.mapRange = info.map_range;
    state.calibratedPixelThreshold = info.pixel_threshold ?? null;
    updateColourScale();
    const middle = (info.map_range[0] + info.map_range[1]) / 2;
    state.defaults = {
      image: info.image_threshold ?? 0.5,
      pixel: info.pixel_threshold ?? middle,
    };
    fillMethodChoice(info.methods);
    const checksum = info.backbone_sha256 ? ` (sha256 ${info.backbone_sha256.slice(0, 12)}…)` : "";
    const backbone = info.backbone ? `backbone ${info.backbone}${checksum} at ` : "";
    const sets = info.scores_sets ? " Images dropped together are scored as one set." : "";
    $("#model-info").textContent =
      `${info.method}: ${backbone}${info.image_size} px; ` +
      `image threshold ${describeThreshold(info.image_threshold, info.image_threshold_source)}, ` +
      `mask threshold ${describeThreshold(info.pixel_threshold, info.pixel_threshold_source)}; ` +
      `uploads up to ${(info.limits.max_upload_bytes / 1048576).toFixed(0)} MB.${sets}` +
      describePromise(info.false_alarm);
    updatePixelSliderRange();
    setThresholds(state.defaults.image, state.defaults.pixel);
  } catch (error) {
    $("#model-info").textContent = `Model information unavailable: ${error.message}`;
  }
}

function describePromise(promise) {
  // what thresholds set for a false-alarm rate promise, as calibrate reported it
  if (!promise) return "";
  return (
    ` The ${promise.applies_to.join(" and ")} threshold${promise.applies_to.length > 1 ? "s" : ""} ` +
    `aim at a false-alarm rate of ${promise.target} (from ${promise.n_good} good images; ` +
    `at ${Math.round(promise.confidence * 100)} % confidence at most ${formatNumber(promise.upper_bound)}).`
  );
}

function setThresholds(image, pixel) {
  $("#image-threshold").value = image;
  $("#pixel-threshold").value = pixel;
  readThresholds();
}

function readThresholds() {
  state.imageThreshold = Number($("#image-threshold").value);
  state.pixelThreshold = Number($("#pixel-threshold").value);
  $("#image-threshold-value").textContent = formatNumber(state.imageThreshold);
  $("#pixel-threshold-value").textContent = formatNumber(state.pixelThreshold);
  scheduleRedraw();
}

function updatePixelSliderRange() {
  const slider = $("#pixel-threshold");
  let low = Math.min(state.defaults.pixel, state.pixelThreshold);
  let high = Math.max(state.defaults.pixel, state.pixelThreshold);
  const maps = state.items.filter((item) => item.result).map((item) => item.result.map);
  if (maps.length === 0) {
    [low, high] = [Math.min(low, state.mapRange[0]), Math.max(high, state.mapRange[1])];
  }
  for (const map of maps) {
    low = Math.min(low, map.min);
    high = Math.max(high, map.max);
  }
  const margin = Math.max((high - low) * 0.02, 1e-3);
  const value = slider.value;
  slider.min = low - margin;
  slider.max = high + margin;
  slider.step = (high - low + 2 * margin) / 1000;
  slider.value = value;
  if (Number(slider.value) !== state.pixelThreshold) readThresholds();
}

function addFiles(fileList) {
  const files = Array.from(fileList);
  const added = [];
  for (const file of files) {
    const card = $("#card-template").content.firstElementChild.cloneNode(true);
    const item = { id: state.nextId++, file, card, result: null, values: null, layer: null };
    card.dataset.id = item.id;
    card.querySelector(".filename").textContent = file.name;
    const original = card.querySelector("img.original");
    item.objectUrl = URL.createObjectURL(file);
    original.addEventListener("load", () => {
      drawMask(item);
      drawHeat(item);
    });
    original.addEventListener("error", () => {
      original.replaceWith(Object.assign(document.createElement("p"), {
        className: "no-preview",
        textContent: "This browser cannot show this format.",
      }));
    });
    original.src = item.objectUrl;
    state.items.push(item);
    $("#results").append(card);
    added.push(item);
  }
  updateSummary();
  // scored once the references being read (if any) are ready, never before
  state.referencesReady.then(() => {
    if (state.scoresSets) {
      analyseSet(added);
      return;
    }
    state.queue.push(...added);
    pumpQueue();
  });
}

function scoredWith() {
  // what a card was scored with, shown on it: results with and without references differ
  return state.references
    ? { id: state.references, text: `with ${state.referenceCount} good parts` }
    : { id: "none", text: "without references" };
}

function markScoredWith(item, used) {
  item.card.dataset.references = used.id;
  item.card.querySelector(".scored-with").textContent = used.text;
}

function pumpQueue() {
  while (state.active < UPLOAD_CONCURRENCY && state.queue.length > 0) {
    const item = state.queue.shift();
    state.active += 1;
    analyse(item).finally(() => {
      state.active -= 1;
      pumpQueue();
    });
  }
}

function scoringQuery() {
  const query = new URLSearchParams();
  if (state.method) query.set("method", state.method);
  if (state.references) query.set("references", state.references);
  return query.toString();
}

async function post(path, fieldName, files) {
  const body = new FormData();
  for (const file of files) body.append(fieldName, file, file.name);
  const url = `${path}?${scoringQuery()}`;
  for (let attempt = 1; ; attempt++) {
    const response = await fetch(url, { method: "POST", body });
    if (response.status !== 503 || attempt === BUSY_RETRIES) return response;
    await new Promise((resolve) => setTimeout(resolve, 1000 * attempt));
  }
}

async function readAnswer(response) {
  const payload = await response.json().catch(() => ({ detail: response.statusText }));
  if (!response.ok) {
    throw new Error(`${payload.detail || response.statusText} (HTTP ${response.status})`);
  }
  return payload;
}

function showResult(item, payload) {
  if (!state.items.includes(item)) return;
  item.result = payload;
  item.values = decodeMap(payload.map);
  if (!updateColourScale()) drawHeat(item);
  item.card.querySelector(".score").textContent = `score ${formatNumber(payload.score)}`;
  item.card.dataset.score = payload.score;
  item.card.dataset.state = "done";
  updatePixelSliderRange();
  updateCard(item);
  if ($("#sort-by-score").checked) sortCards();
}

function showError(item, text) {
  item.card.dataset.state = "error";
  item.card.querySelector(".verdict").textContent = "failed";
  item.card.querySelector(".panels").hidden = true;
  const message = item.card.querySelector(".error");
  message.textContent = text;
  message.hidden = false;
}

async function analyse(item) {
  const used = scoredWith();
  try {
    showResult(item, await readAnswer(await post("/v1/predict", "file", [item.file])));
    markScoredWith(item, used);
  } catch (error) {
    showError(item, error.message);
  }
  updateSummary();
}

async function analyseSet(items) {
  // the images score each other, so they travel in one request and come back in order
  const used = scoredWith();
  try {
    const answer = await readAnswer(await post("/v1/predict/set", "files", items.map((i) => i.file)));
    answer.results.forEach((result, index) => {
      if ("detail" in result) showError(items[index], `${result.detail} (HTTP ${result.status})`);
      else {
        showResult(items[index], result);
        markScoredWith(items[index], used);
      }
    });
  } catch (error) {
    for (const item of items) showError(item, error.message);
  }
  updateSummary();
}

function jet(x) {
  // matplotlib's jet, as the report's overlays are coloured: blue (low) to red (high)
  const channel = (v) => Math.round(255 * Math.min(1, Math.max(0, v)));
  return [channel(1.5 - Math.abs(4 * x - 3)), channel(1.5 - Math.abs(4 * x - 2)), channel(1.5 - Math.abs(4 * x - 1))];
}

function chooseColourScale() {
  // what the scores mean, in colour: a calibrated mask threshold mid-scale; else the
  // method's range where the maps fill it (probabilities); else the robust range of the
  // maps shown (raw distances, MuSc's near 0.3-0.5 on a 0-2 range, were uniform blue)
  const [low, high] = state.mapRange;
  const threshold = state.calibratedPixelThreshold;
  if (threshold !== null && threshold > low) {
    return { low, high: low + 2 * (threshold - low), source: `calibrated mask threshold ${formatNumber(threshold)} mid-scale` };
  }
  const shown = state.items.filter((item) => item.values);
  const fixed = { low, high, source: "the method's map range" };
  if (shown.length === 0) return fixed;
  const total = shown.reduce((count, item) => count + item.values.length, 0);
  const stride = Math.max(1, Math.floor(total / ROBUST_SAMPLE));
  const sample = [];
  for (const item of shown) for (let i = 0; i < item.values.length; i += stride) sample.push(item.values[i]);
  const sorted = Float32Array.from(sample).sort();
  const at = (share) => sorted[Math.min(sorted.length - 1, Math.floor(share * (sorted.length - 1)))];
  const [bottom, top] = [at(0.01), at(0.999)];
  if (!(top > bottom) || top - bottom >= FILLED_SHARE * (high - low)) return fixed;
  return {
    low: bottom,
    high: top,
    source: `robust range of the ${shown.length} image${shown.length > 1 ? "s" : ""} shown (1st-99.9th percentile of map values), the same for every card`,
  };
}

function showColourScale() {
  const { low, high, source } = state.colourScale;
  const legend = $("#colour-scale");
  legend.hidden = false;
  legend.dataset.low = low;
  legend.dataset.high = high;
  legend.querySelector(".low").textContent = Number(low).toPrecision(4);
  legend.querySelector(".high").textContent = Number(high).toPrecision(4);
  legend.querySelector(".source").textContent = `colour scale: ${source}`;
  const bar = legend.querySelector("canvas.bar");
  const context = bar.getContext("2d");
  for (let x = 0; x < bar.width; x++) {
    const [r, g, b] = jet(x / (bar.width - 1));
    context.fillStyle = `rgb(${r},${g},${b})`;
    context.fillRect(x, 0, 1, bar.height);
  }
}

function updateColourScale() {
  // shown on the page; true when it changed, and every card was redrawn on it
  const chosen = chooseColourScale();
  const current = state.colourScale;
  const changed = chosen.low !== current.low || chosen.high !== current.high || chosen.source !== current.source;
  state.colourScale = chosen;
  showColourScale();
  if (changed) for (const item of state.items) drawHeat(item);
  return changed;
}

// The card's canvas (selector) at the overlay's size, the original image drawn on it at
// the given opacity: what the heat map and the mask are drawn over.
function canvasOverOriginal(item, selector, opacity) {
  const canvas = item.card.querySelector(selector);
  const { width, height } = item.result.overlay_size;
  if (canvas.width !== width || canvas.height !== height) {
    canvas.width = width;
    canvas.height = height;
  }
  const context = canvas.getContext("2d");
  context.fillStyle = "#222";
  context.fillRect(0, 0, width, height);
  const original = item.card.querySelector("img.original");
  if (original && original.complete && original.naturalWidth > 0) {
    context.globalAlpha = opacity;
    context.drawImage(original, 0, 0, width, height);
    context.globalAlpha = 1;
  }
  return { context, width, height };
}

function drawHeat(item) {
  if (!item.result) return;
  const { context, width, height } = canvasOverOriginal(item, "canvas.heat", 1);
  const { map } = item.result;
  const layer = document.createElement("canvas");
  layer.width = map.width;
  layer.height = map.height;
  const pixels = layer.getContext("2d").createImageData(map.width, map.height);
  const { low, high } = state.colourScale;
  const span = high > low ? high - low : 1;
  const alpha = Math.round(255 * HEAT_ALPHA);
  for (let i = 0; i < item.values.length; i++) {
    const [r, g, b] = jet(Math.min(1, Math.max(0, (item.values[i] - low) / span)));
    pixels.data.set([r, g, b, alpha], 4 * i);
  }
  layer.getContext("2d").putImageData(pixels, 0, 0);
  context.imageSmoothingEnabled = true;
  context.drawImage(layer, 0, 0, width, height);
}

function maskLayer(item) {
  const { map } = item.result;
  if (!item.layer) {
    item.layer = document.createElement("canvas");
    item.layer.width = map.width;
    item.layer.height = map.height;
  }
  const context = item.layer.getContext("2d");
  const pixels = context.createImageData(map.width, map.height);
  let above = 0;
  for (let i = 0; i < item.values.length; i++) {
    if (item.values[i] >= state.pixelThreshold) {
      pixels.data.set(MASK_COLOUR, 4 * i);
      above += 1;
    }
  }
  context.putImageData(pixels, 0, 0);
  return above / item.values.length;
}

function drawMask(item) {
  if (!item.result) return null;
  const { context, width, height } = canvasOverOriginal(item, "canvas.mask", 0.6);
  const fraction = maskLayer(item);
  context.imageSmoothingEnabled = true;
  context.drawImage(item.layer, 0, 0, width, height);
  return fraction;
}

function updateCard(item) {
  if (!item.result) return;
  const anomalous = item.result.score >= state.imageThreshold;
  const card = item.card;
  card.dataset.verdict = anomalous ? "anomalous" : "normal";
  card.querySelector(".verdict").textContent = anomalous ? "Anomalous" : "Normal";
  const fraction = drawMask(item);
  card.dataset.anomalousFraction = fraction.toFixed(4);
  card.querySelector(".area").textContent = `${(100 * fraction).toFixed(1)} % of the image`;
}

function scheduleRedraw() {
  if (state.redrawPending) return;
  state.redrawPending = true;
  requestAnimationFrame(() => {
    state.redrawPending = false;
    for (const item of state.items) updateCard(item);
    updateSummary();
  });
}

function updateSummary() {
  const done = state.items.filter((item) => item.result);
  const failed = state.items.filter((item) => item.card.dataset.state === "error").length;
  const waiting = state.items.length - done.length - failed;
  if (state.items.length === 0) {
    $("#summary").textContent = "No images yet.";
    return;
  }
  const anomalous = done.filter((item) => item.result.score >= state.imageThreshold).length;
  const parts = [
    `${done.length} scored`,
    `${anomalous} anomalous at threshold ${formatNumber(state.imageThreshold)}`,
  ];
  if (failed) parts.push(`${failed} failed`);
  if (waiting) parts.push(`${waiting} waiting`);
  $("#summary").textContent = parts.join(", ") + ".";
}

function sortCards() {
  const ordered = [...state.items];
  if ($("#sort-by-score").checked) {
    ordered.sort((a, b) => (b.result ? b.result.score : -1) - (a.result ? a.result.score : -1));
  }
  $("#results").append(...ordered.map((item) => item.card));
}

function clearResults() {
  for (const item of state.items) URL.revokeObjectURL(item.objectUrl);
  state.items = [];
  state.queue = [];
  $("#results").replaceChildren();
  updatePixelSliderRange();
  updateColourScale();
  updateSummary();
}

function setUpDropZone() {
  const zone = $("#drop-zone");
  const input = $("#file-input");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    addFiles(event.dataTransfer.files);
  });
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      input.click();
    }
  });
  input.addEventListener("change", () => {
    addFiles(input.files);
    input.value = "";
  });
}

async function setReferences(fileList) {
  const files = Array.from(fileList);
  if (files.length === 0) return;
  const info = $("#reference-info");
  info.textContent = `Reading ${files.length} known-good images…`;
  let ready;
  state.referencesReady = new Promise((resolve) => { ready = resolve; });
  try {
    state.references = null;
    const answer = await readAnswer(await post("/v1/references", "files", files));
    state.references = answer.id;
    state.referenceCount = answer.count;
    const failed = answer.failed.length ? `; ${answer.failed.length} unreadable` : "";
    info.textContent =
      `${answer.count} good parts in use (${(answer.bytes / 1048576).toFixed(1)} MB)${failed}. ` +
      "Images dropped from now on are also compared with them.";
    $("#clear-references").hidden = false;
  } catch (error) {
    info.textContent = `References not used: ${error.message}`;
  }
  ready(); // the drops held meanwhile go now, with the references (or, failed, without)
  loadModelInfo();
}

function clearReferences() {
  state.references = null;
  $("#clear-references").hidden = true;
  $("#reference-info").textContent = "Images dropped above are then also compared with these.";
  loadModelInfo();
}

document.addEventListener("DOMContentLoaded", () => {
  setUpDropZone();
  $("#image-threshold").addEventListener("input", readThresholds);
  $("#pixel-threshold").addEventListener("input", readThresholds);
  $("#reset-thresholds").addEventListener("click", () => {
    setThresholds(state.defaults.image, state.defaults.pixel);
  });
  $("#clear-results").addEventListener("click", clearResults);
  $("#sort-by-score").addEventListener("change", sortCards);
  $("#method").addEventListener("change", (event) => {
    state.method = event.target.value;
    clearReferences(); // a reference set belongs to the method it was made for
  });
  $("#reference-input").addEventListener("change", (event) => {
    setReferences(event.target.files);
    event.target.value = "";
  });
  $("#clear-references").addEventListener("click", clearReferences);
  readThresholds();
  loadModelInfo();
});
