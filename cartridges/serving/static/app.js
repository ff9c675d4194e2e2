// The cartridges page: the registry, a playground, compare and schedules, over this server's own API.
// Everything from the server (answers, manifests, names) is put on the page as text (textContent,
// text nodes, attribute values), never parsed as HTML: an answer holding <script> shows as those
// characters. The server's Content-Security-Policy forbids inline script besides.

const KEY_STORAGE = "cartridges-api-key"; // sessionStorage: this tab only, gone when it closes
const $ = (id) => document.getElementById(id);

class ServerError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

// ---- small DOM helpers: text only ----------------------------------------------------------
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "onclick") node.addEventListener("click", value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function clear(node, ...children) {
  node.replaceChildren();
  return append(node, children);
}

function table(headers, rows, numeric = []) {
  const head = el("tr", {}, headers.map((h, i) => el("th", numeric.includes(i) ? { class: "num" } : {}, h)));
  const body = rows.map((row) =>
    row instanceof Node ? row : el("tr", {}, row.map((cell, i) => el("td", numeric.includes(i) ? { class: "num" } : {}, cell))),
  );
  return el("table", {}, el("thead", {}, head), el("tbody", {}, body));
}

const fmt = {
  bytes(n) {
    if (n === null || n === undefined) return "—";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
  },
  number(x, digits = 3) {
    if (typeof x !== "number") return x === null || x === undefined ? "—" : String(x);
    return Number.isInteger(x) ? x.toLocaleString("en-US") : x.toFixed(digits);
  },
  time(iso) { return iso ? iso.replace("T", " ").replace("+00:00", " UTC") : "—"; },
};

// ---- errors and the API key ---------------------------------------------------------------
function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function hideError() { $("error").hidden = true; }

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch { /* not JSON: the status line says it */ }
  if (response.status === 401) $("key-form").hidden = false;
  return new ServerError(message, response.status);
}

async function api(path, options = {}) {
  const headers = { ...authHeaders(), ...(options.body ? { "Content-Type": "application/json" } : {}) };
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) throw await errorOf(response);
  return response;
}

async function getJSON(path) { return (await api(path)).json(); }

// ---- streamed chat ------------------------------------------------------------------------
// POST /v1/chat/completions with stream: true, reading the server-sent events as they come.
async function streamChat(request, onText) {
  const started = performance.now();
  const response = await api("v1/chat/completions", {
    method: "POST",
    body: JSON.stringify({ ...request, stream: true, stream_options: { include_usage: true } }),
  });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", first = null, usage = null, finish = null;
  const take = (line) => {
    if (!line.startsWith("data:")) return; // comments (pings) and event names
    const data = line.slice(5).trim();
    if (!data || data === "[DONE]") return;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new ServerError(chunk.error.message, 500);
    if (chunk.usage) usage = chunk.usage;
    for (const choice of chunk.choices || []) {
      if (choice.finish_reason) finish = choice.finish_reason;
      const text = choice.delta && choice.delta.content;
      if (text) {
        if (first === null) first = performance.now();
        onText(text);
      }
    }
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.search(/\r?\n/)) >= 0) {
      const line = buffer.slice(0, cut);
      buffer = buffer.slice(buffer[cut] === "\r" ? cut + 2 : cut + 1);
      take(line);
    }
  }
  take(buffer);
  const ended = performance.now();
  return { usage, finish, ttft: ((first ?? ended) - started) / 1000, decodeSeconds: (ended - (first ?? ended)) / 1000 };
}

function usageLine(result) {
  const u = result.usage;
  if (!u) return "no usage reported";
  const parts = [
    u.cartridges && u.cartridges.length ? `cartridges: ${u.cartridges.join(" + ")}` : "no cartridge",
    `${u.cartridge_tokens} cartridge tokens`,
    `${u.prompt_tokens} prompt + ${u.completion_tokens} answer tokens`,
    `first token ${result.ttft.toFixed(2)} s`,
  ];
  if (u.completion_tokens > 1 && result.decodeSeconds > 0) {
    parts.push(`${((u.completion_tokens - 1) / result.decodeSeconds).toFixed(1)} tokens/s`);
  }
  if (result.finish) parts.push(`finish: ${result.finish}`);
  return parts.join(" · ");
}

function unitsLine(usage) {
  if (!usage || !usage.units || !usage.units.length) return null;
  const units = usage.units.map((u) => `${u.id} (score ${u.score.toFixed(2)}, ${u.kv_tokens} KV)`); // an id names its source
  return el("div", { class: "usage units" }, `units: ${units.join("; ")}`);
}

// A choice of what answers: a model or cartridge reference, more composed after it, a library budget.
function chatRequest(model, compose, budget, messages, maxTokens, temperature) {
  const request = { model, messages, max_tokens: maxTokens, temperature };
  const more = compose.split(",").map((s) => s.trim()).filter(Boolean);
  if (more.length) request.cartridges = more.map((id) => ({ id }));
  if (budget) request.library = { budget };
  return request;
}

// ---- registry view ------------------------------------------------------------------------
let selectedRef = null;

async function loadRegistry() {
  const list = $("registry-list");
  let catalog;
  try {
    catalog = await getJSON("v1/cartridges");
  } catch (error) {
    showError(error.message);
    clear(list, el("p", { class: "muted" }, "The registry could not be read."));
    return;
  }
  hideError();
  const rows = [];
  for (const group of catalog.data) {
    const aliases = Object.entries(group.aliases).map(([alias, version]) => `${alias} → @${version}`);
    rows.push(el("tr", { class: "name-row" }, el("td", { colspan: 8 }, group.name, aliases.length ? `   (${aliases.join(", ")})` : "")));
    for (const v of group.versions) {
      const row = el("tr", { dataset: { ref: v.ref }, class: v.ref === selectedRef ? "current" : "" },
        el("td", {}, el("button", { type: "button", class: "link", onclick: () => selectVersion(v.ref) }, v.ref)),
        el("td", {}, v.aliases.map((a) => el("span", { class: "alias" }, a))),
        el("td", {}, v.method),
        el("td", { class: "num" }, fmt.number(v.num_tokens)),
        el("td", {}, v.dtype),
        el("td", { class: "num" }, fmt.bytes(v.kv_bytes)),
        el("td", { class: "num" }, fmt.bytes(v.size_bytes)),
        el("td", {}, fmt.time(v.created_at)),
      );
      rows.push(row);
    }
  }
  const headers = ["version", "aliases", "method", "KV tokens", "precision", "KV loaded", "on disk", "created"];
  clear(list, rows.length ? table(headers, rows, [3, 5, 6]) : el("p", { class: "muted" }, "No cartridges in this registry yet."));
  const skipped = catalog.skipped.map((s) => el("li", {}, `${s.path}: ${s.reason}`));
  clear($("registry-skipped"), skipped.length ? [el("h3", {}, "Not listed"), el("ul", {}, skipped)] : []);
}

async function selectVersion(ref) {
  selectedRef = ref;
  if (location.hash !== `#registry/${ref}`) history.replaceState(null, "", `#registry/${ref}`);
  for (const row of document.querySelectorAll("#registry-list tr[data-ref]")) {
    row.classList.toggle("current", row.dataset.ref === ref);
  }
  const panel = $("registry-detail");
  clear(panel, el("p", { class: "muted" }, `Loading ${ref}…`));
  let card;
  try {
    card = await getJSON(`v1/cartridges/${encodeURIComponent(ref)}`);
  } catch (error) {
    clear(panel, el("p", { class: "muted" }, `${ref} could not be shown.`));
    if (error.status === 404) { selectedRef = null; await loadRegistry(); } // removed while the page was open
    showError(error.message); // after the reload, which clears the message of an earlier error
    return;
  }
  hideError();
  clear(panel, versionCard(card));
}

function versionCard(card) {
  const m = card.manifest;
  const verifyStatus = el("span", { class: "muted verify-status" }, "not checked yet");
  const verifyButton = el("button", { type: "button", class: "verify" }, "Verify");
  verifyButton.addEventListener("click", async () => {
    verifyStatus.className = "muted verify-status";
    verifyStatus.textContent = "checking…";
    try {
      const result = await getJSON(`v1/cartridges/${encodeURIComponent(card.ref)}/verify`);
      verifyStatus.className = `verify-status ${result.ok ? "ok" : "bad"}`;
      verifyStatus.textContent = result.ok ? `OK: ${result.message}` : `fails: ${result.message}`;
    } catch (error) {
      verifyStatus.className = "verify-status bad";
      verifyStatus.textContent = error.message;
    }
  });
  const tryIt = el("button", { type: "button", onclick: () => { $("play-model").value = card.ref; location.hash = "#playground"; } }, "Try in playground");
  const facts = [
    ["created", fmt.time(m.created_at)],
    ["aliases", card.aliases.length ? card.aliases.join(", ") : "—"],
    ["method", m.method],
    ["KV tokens", `${fmt.number(m.num_tokens)} (${m.num_frozen_tokens} frozen)`],
    ["precision", m.dtype],
    ["KV loaded", fmt.bytes(card.kv_bytes)],
    ["on disk", fmt.bytes(card.size_bytes)],
    ["model", m.model_id],
    ["model fingerprint", m.model_fingerprint],
    ["tokenizer fingerprint", m.tokenizer_fingerprint],
    ["shape", `${m.num_layers} layers × ${m.num_kv_heads} KV heads × ${m.head_dim}`],
    ["tool version", m.tool_version],
  ];
  const corpus = m.corpus.map((c) => el("li", {}, `${fmt.number(c.num_documents)} documents, ${fmt.number(c.num_tokens)} tokens, from ${c.source} (${c.fingerprint.slice(0, 12)})`));
  const lineage = [el("li", {}, `${card.ref} (this version)`), ...card.lineage.map((p) =>
    p.found
      ? el("li", {}, "← ", el("button", { type: "button", class: "link", onclick: () => selectVersion(p.ref) }, p.ref), ` ${p.method}, ${fmt.time(p.created_at)}`)
      : el("li", { class: "muted" }, `← ${p.ref}: ${p.note}`),
  )];
  const metrics = Object.entries(m.metrics).map(([k, v]) => [k, fmt.number(v, 4)]);
  return el("div", { class: "card" },
    el("div", { class: "toolbar" }, el("h2", {}, card.ref), verifyButton, tryIt),
    el("div", {}, verifyStatus),
    el("dl", {}, facts.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])),
    el("h3", {}, "Corpus"), el("ul", {}, corpus),
    el("h3", {}, "Lineage"), el("ul", { class: "lineage" }, lineage),
    card.evaluation.length ? [el("h3", {}, "Evaluation"), evaluationTable(card.evaluation)] : null,
    card.training_curve ? [el("h3", {}, "Training"), trainingPlot(card.training_curve)] : null,
    metrics.length ? [el("h3", {}, "Metrics"), table(["metric", "value"], metrics, [1])] : null,
    card.library ? [el("h3", {}, "Units"), unitsTable(card.library)] : null,
    card.library_problem ? el("p", { class: "bad" }, card.library_problem) : null,
    el("h3", {}, "Recipe"), el("pre", { class: "recipe" }, JSON.stringify(card.recipe, null, 2)),
  );
}

// One row per context the build scored (none, the start, the cartridge); a measure no row has is left out.
function evaluationTable(rows) {
  const measures = [["nll", "gold NLL"], ["rank_accuracy", "rank accuracy"], ["f1", "answer F1"]].filter(([key]) => rows.some((r) => key in r));
  return table(["context", ...measures.map(([, label]) => label)],
    rows.map((r) => [r.method, ...measures.map(([key]) => fmt.number(r[key], 3))]), measures.map((_, i) => i + 1));
}

const UNITS_SHOWN = 200;

function unitsTable(library) {
  const units = library.units;
  const note = `${units.length} units of at most ${library.unit_tokens} tokens; ${library.default_budget} KV tokens routed per request by default; ${library.positions} positions, ${library.order.replace("_", " ")}`;
  const rows = units.slice(0, UNITS_SHOWN).map((u) => [u.id, u.source, u.title, fmt.number(u.text_tokens), fmt.number(u.num_tokens), u.init, u.reused_from || "built here"]);
  return [el("p", { class: "muted" }, note), table(["id", "source", "title", "text tokens", "KV tokens", "init", "prefix"], rows, [3, 4]),
    units.length > UNITS_SHOWN ? el("p", { class: "muted" }, `and ${units.length - UNITS_SHOWN} more`) : null];
}

// Loss and held-out KL over steps, drawn as SVG lines (no plotting library).
const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== null) node.textContent = text;
  return node;
}

function trainingPlot(curve) {
  const series = [
    { name: "distillation loss (kd)", xs: curve.step, ys: curve.kd, color: "#2457c5" },
    { name: "top-k KL, training batch", xs: curve.step, ys: curve.topk_kl, color: "#98a2b3" },
    { name: "top-k KL, held out", xs: curve.eval_step || [], ys: curve.eval_topk_kl || [], color: "#d92d20" },
  ].filter((s) => s.xs && s.xs.length && s.ys && s.ys.length === s.xs.length);
  if (!series.length) return el("p", { class: "muted" }, "No training steps recorded.");
  const width = 560, height = 240, left = 52, right = 12, top = 12, bottom = 52;
  const xs = series.flatMap((s) => s.xs), ys = series.flatMap((s) => s.ys).filter(Number.isFinite);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)], [y0, y1] = [Math.min(0, ...ys), Math.max(...ys)];
  const sx = (x) => left + (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0)) * (width - left - right);
  const sy = (y) => height - bottom - (y1 === y0 ? 0.5 : (y - y0) / (y1 - y0)) * (height - top - bottom);
  const plot = svg("svg", { class: "plot", width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "training curve" });
  plot.append(svg("line", { x1: left, y1: height - bottom, x2: width - right, y2: height - bottom, stroke: "#98a2b3" }));
  plot.append(svg("line", { x1: left, y1: top, x2: left, y2: height - bottom, stroke: "#98a2b3" }));
  for (const y of [y0, (y0 + y1) / 2, y1]) plot.append(svg("text", { x: left - 6, y: sy(y) + 4, "text-anchor": "end" }, y.toFixed(2)));
  plot.append(svg("text", { x: sx(x0), y: height - bottom + 16, "text-anchor": "start" }, `step ${x0}`));
  plot.append(svg("text", { x: sx(x1), y: height - bottom + 16, "text-anchor": "end" }, `step ${x1}`));
  series.forEach((s, i) => {
    const points = s.xs.map((x, j) => `${sx(x).toFixed(1)},${sy(s.ys[j]).toFixed(1)}`).join(" ");
    plot.append(svg("polyline", { points, fill: "none", stroke: s.color, "stroke-width": 1.5 }));
    if (s.xs.length < 30) s.xs.forEach((x, j) => plot.append(svg("circle", { cx: sx(x), cy: sy(s.ys[j]), r: 2.5, fill: s.color })));
    const lx = left + i * 170;
    plot.append(svg("rect", { x: lx, y: height - 18, width: 10, height: 10, fill: s.color }));
    plot.append(svg("text", { x: lx + 14, y: height - 9 }, s.name));
  });
  return plot;
}

// ---- playground -----------------------------------------------------------------------------
const conversation = [];

async function sendPlayground(event) {
  event.preventDefault();
  const message = $("play-message").value.trim();
  if (!message) return;
  const transcript = $("play-transcript");
  conversation.push({ role: "user", content: message });
  append(transcript, [el("div", { class: "turn" }, el("div", { class: "role" }, "you"), el("div", { class: "answer user" }, message))]);
  const answer = el("div", { class: "answer assistant" });
  const usage = el("div", { class: "usage" }, "waiting for the first token…");
  const turn = el("div", { class: "turn" }, el("div", { class: "role" }, $("play-model").value), answer, usage);
  append(transcript, [turn]);
  $("play-message").value = "";
  $("play-send").disabled = true;
  const request = chatRequest($("play-model").value.trim(), $("play-compose").value, Number($("play-budget").value) || null,
    conversation.slice(), Number($("play-max-tokens").value) || 128, Number($("play-temperature").value) || 0);
  try {
    const result = await streamChat(request, (text) => { answer.append(document.createTextNode(text)); });
    conversation.push({ role: "assistant", content: answer.textContent });
    usage.textContent = usageLine(result);
    const units = unitsLine(result.usage);
    if (units) turn.append(units);
    hideError();
  } catch (error) {
    conversation.pop(); // the question is not part of the conversation the server saw answered
    usage.textContent = "";
    answer.classList.add("failed");
    answer.textContent = error.message;
    showError(error.message);
  } finally {
    $("play-send").disabled = false;
  }
}

function newChat() {
  conversation.length = 0;
  clear($("play-transcript"));
}

// ---- compare --------------------------------------------------------------------------------
const MIN_CHOICES = 2, MAX_CHOICES = 4;

function addChoice(value = "") {
  const columns = $("compare-columns");
  if (columns.children.length >= MAX_CHOICES) return;
  const index = columns.children.length + 1;
  const column = el("div", { class: "column" },
    el("label", {}, `Choice ${index}`, el("input", { class: "compare-model", list: "model-refs", spellcheck: "false", required: "" })),
    el("label", {}, "Compose with", el("input", { class: "compare-compose", list: "model-refs", spellcheck: "false" })),
    el("label", {}, "Library budget", el("input", { class: "compare-budget", type: "number", min: 2 })),
    el("div", { class: "answer" }),
    el("div", { class: "usage" }),
  );
  column.querySelector(".compare-model").value = value;
  columns.append(column);
  updateChoiceButtons();
}

function updateChoiceButtons() {
  const count = $("compare-columns").children.length;
  $("compare-add").disabled = count >= MAX_CHOICES;
  $("compare-remove").disabled = count <= MIN_CHOICES;
}

async function sendCompare(event) {
  event.preventDefault();
  const message = $("compare-message").value.trim();
  if (!message) return;
  $("compare-send").disabled = true;
  hideError();
  const maxTokens = Number($("compare-max-tokens").value) || 128, temperature = Number($("compare-temperature").value) || 0;
  const runs = [...$("compare-columns").children].map(async (column) => {
    const answer = column.querySelector(".answer"), usage = column.querySelector(".usage");
    answer.classList.remove("failed");
    clear(answer);
    usage.textContent = "waiting for the first token…";
    column.querySelector(".units")?.remove();
    const request = chatRequest(column.querySelector(".compare-model").value.trim(), column.querySelector(".compare-compose").value,
      Number(column.querySelector(".compare-budget").value) || null, [{ role: "user", content: message }], maxTokens, temperature);
    try {
      const result = await streamChat(request, (text) => { answer.append(document.createTextNode(text)); });
      usage.textContent = usageLine(result);
      const units = unitsLine(result.usage);
      if (units) column.append(units);
      column.dataset.done = "true";
    } catch (error) {
      answer.classList.add("failed");
      answer.textContent = error.message;
      usage.textContent = "";
      column.dataset.done = "failed";
    }
  });
  for (const column of $("compare-columns").children) delete column.dataset.done;
  await Promise.all(runs);
  $("compare-send").disabled = false;
}

// ---- schedules ------------------------------------------------------------------------------
async function loadSchedules() {
  let found;
  try {
    found = await getJSON("v1/schedules");
  } catch (error) {
    showError(error.message);
    return;
  }
  hideError();
  clear($("schedules-list"), found.schedules.length
    ? table(["name", "corpus", "cron", "config", "next run"], found.schedules.map((s) => [s.name, s.corpus, s.cron, [s.config, ...s.overrides].join(" "), fmt.time(s.next_run)]))
    : el("p", { class: "muted" }, "No schedules (cartridges schedule add CORPUS --name NAME --cron '0 2 * * *')."));
  clear($("schedules-history"), found.history.length
    ? table(["name", "started", "finished", "outcome", "detail"], found.history.map((h) => [h.name, fmt.time(h.started), fmt.time(h.finished), el("span", { class: h.status === "failed" ? "bad" : "ok" }, h.status), h.detail]))
    : el("p", { class: "muted" }, "No builds yet."));
}

// ---- navigation -----------------------------------------------------------------------------
async function loadModels() {
  try {
    const models = await getJSON("v1/models");
    const ids = models.data.map((m) => m.id);
    clear($("model-refs"), ids.map((id) => el("option", { value: id })));
    $("base-model").textContent = `model: ${ids[0]}`;
    if (!$("play-model").value) $("play-model").value = ids[0];
    for (const input of document.querySelectorAll(".compare-model")) if (!input.value) input.value = ids[0];
  } catch (error) {
    showError(error.message);
  }
}

function route() {
  const [view, ...rest] = (location.hash.slice(1) || "registry").split("/");
  const known = ["registry", "playground", "compare", "schedules"].includes(view) ? view : "registry";
  for (const section of document.querySelectorAll("main > section")) section.hidden = section.dataset.view !== known;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("current", link.dataset.view === known);
  if (known === "registry") {
    loadRegistry().then(() => { const ref = rest.join("/"); if (ref && ref !== selectedRef) selectVersion(decodeURIComponent(ref)); });
  }
  if (known === "schedules") loadSchedules();
}

function useKey(event) {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORAGE, $("key-input").value);
  $("key-input").value = "";
  $("key-form").hidden = true;
  hideError();
  loadModels();
  route();
}

function start() {
  $("key-form").addEventListener("submit", useKey);
  $("registry-reload").addEventListener("click", loadRegistry);
  $("schedules-reload").addEventListener("click", loadSchedules);
  $("play-form").addEventListener("submit", sendPlayground);
  $("play-new").addEventListener("click", newChat);
  $("compare-form").addEventListener("submit", sendCompare);
  $("compare-add").addEventListener("click", () => addChoice());
  $("compare-remove").addEventListener("click", () => {
    const columns = $("compare-columns");
    if (columns.children.length > MIN_CHOICES) columns.lastElementChild.remove();
    updateChoiceButtons();
  });
  addChoice();
  addChoice();
  window.addEventListener("hashchange", route);
  loadModels();
  route();
}

start();
