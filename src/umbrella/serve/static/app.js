// The `umbrella serve` page: NiiVue viewer, chat and evaluation browser over the JSON API.
"use strict";

const token = new URLSearchParams(location.search).get("token");
const state = { info: null, scan: null, nv: null, rows: [], sortKey: null, sortUp: true };
const $ = (id) => document.getElementById(id);

function withToken(url) {
  return token ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : url;
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token) headers.Authorization = "Bearer " + token;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (!response.ok) {
    let detail = body && body.detail;
    if (Array.isArray(detail)) detail = detail.map((d) => d.msg).join("; ");
    throw new Error(`${response.status}: ${detail || response.statusText}`);
  }
  return body;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

// ---------------------------------------------------------------- viewer

async function initViewer() {
  const nv = new niivue.Niivue({ backColor: [0, 0, 0, 1], dragAndDropEnabled: false,
                                 show3Dcrosshair: false, crosshairColor: [1, 0.2, 0.2, 1] });
  await nv.attachToCanvas($("viewer"));
  nv.setSliceType(nv.sliceTypeMultiplanar);
  nv.onLocationChange = (data) => {
    $("location").textContent = data.string || "";
    if (state.scan && state.scan.modality === "rsfMRI" && data.vox) drawTimeCourse(data.vox);
  };
  state.nv = nv;
}

async function showScan(scan) {
  state.scan = scan;
  $("scan-name").textContent = `${scan.modality}: ${scan.name} (${scan.shape.join(" × ")})`;
  $("drop-hint").hidden = true;
  const nv = state.nv;
  while (nv.volumes.length) nv.removeVolume(nv.volumes[0]);
  const volumes = [{ url: withToken(`api/scans/${scan.scan_id}/original.nii.gz`),
                     name: "original.nii.gz" }];
  if (state.info.modalities.includes(scan.modality)) {  // the model's input, over the original
    volumes.push({ url: withToken(`api/scans/${scan.scan_id}/input.nii.gz`), name: "input.nii.gz",
                   colormap: "warm", opacity: $("show-input").checked ? 0.6 : 0 });
  }
  await nv.loadVolumes(volumes);
  $("timecourse-box").hidden = scan.modality !== "rsfMRI";
  document.body.dataset.scanLoaded = scan.scan_id;
}

async function drawTimeCourse(vox) {
  const [x, y, z] = vox.map((v) => Math.round(v));
  let values;
  try {
    values = (await api(`api/scans/${state.scan.scan_id}/timecourse?x=${x}&y=${y}&z=${z}`)).values;
  } catch (err) { return; }
  const canvas = $("timecourse"), ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const lo = Math.min(...values), hi = Math.max(...values), span = hi - lo || 1;
  ctx.strokeStyle = "#4a90d9";
  ctx.beginPath();
  values.forEach((v, i) => {
    const px = 5 + (i / Math.max(values.length - 1, 1)) * (canvas.width - 10);
    const py = canvas.height - 5 - ((v - lo) / span) * (canvas.height - 10);
    if (i) ctx.lineTo(px, py); else ctx.moveTo(px, py);
  });
  ctx.stroke();
}

async function upload(file) {
  const form = new FormData();
  form.append("modality", $("modality").value);
  form.append("file", file, file.name);
  try {
    await showScan(await api("api/scans", { method: "POST", body: form }));
  } catch (err) {
    addError(`upload of ${file.name}: ${err.message}`);
  }
}

// ---------------------------------------------------------------- chat

function addError(text) {
  $("messages").append(el("div", { class: "msg error" }, text));
}

function bars(options) {
  const box = el("div", { class: "bars" });
  for (const { option, prob } of options) {
    const fill = el("div", { class: "fill" });
    fill.style.width = `${(100 * prob).toFixed(1)}%`;
    box.append(el("div", { class: "bar" }, el("span", { class: "label" }, option),
                  el("div", { class: "track" }, fill),
                  el("span", {}, `${(100 * prob).toFixed(1)}%`)));
  }
  return box;
}

function renderAnswer(r) {
  const msg = el("div", { class: "msg answer" },
                 el("div", { class: "q" }, `Q: ${r.question}`),
                 el("div", { class: "a" }, r.answer || "(empty answer)"));
  const about = r.task ? `task: ${r.task}` : "task: none";
  msg.append(el("div", { class: "muted" }, `${about} · ${r.scans.map((s) => s.name).join(", ")}` +
                ` · ${r.seconds.toFixed(2)} s`));
  if (r.notice) msg.append(el("div", { class: "notice" }, r.notice));
  if (r.options) msg.append(bars(r.options));
  if (r.kind === "regression") {
    msg.append(el("div", { class: "muted" }, r.value === null ? "no number could be read"
                  : `value: ${r.value} ${r.unit}`));
  }
  $("messages").append(msg);
}

async function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim() || $("question").placeholder;
  if (!state.scan) { addError("open a scan first (drop a file or click a subject)"); return; }
  $("ask").disabled = true;
  try {
    renderAnswer(await api("api/ask", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ question, scans: [state.scan.scan_id] }) }));
  } catch (err) {
    addError(`${question}: ${err.message}`);
  } finally {
    $("ask").disabled = false;
  }
}

function renderTasks(info) {
  const box = $("tasks");
  if (!info.tasks) { box.append(el("div", { class: "notice" }, info.tasks_note)); return; }
  box.append(el("div", { class: "muted" }, "This model was trained to answer:"));
  for (const [name, t] of Object.entries(info.tasks)) {
    const what = t.kind === "classification" ? ` (${t.options.join(" / ")})`
      : t.unit ? ` (${t.unit})` : "";
    const line = el("div", { class: "task" }, el("b", {}, name), what + " ");
    for (const q of t.questions.slice(0, 3)) {
      const b = el("button", { type: "button" }, q);
      b.onclick = () => { $("question").value = q; };
      line.append(b);
    }
    box.append(line);
  }
  const first = Object.values(info.tasks)[0];
  if (first && first.questions.length) $("question").placeholder = first.questions[0];
}

// ---------------------------------------------------------------- evaluation

const METRICS = { classification: ["accuracy", "balanced_accuracy", "macro_f1", "roc_auc"],
                  regression: ["mae", "rmse", "pearson_r", "r2"] };
const fmt = (v) => (v === null || v === undefined ? "n/a" : typeof v === "number" ? v.toFixed(3) : String(v));

function metricsTable(tasks) {
  const box = $("eval-metrics");
  for (const [name, m] of Object.entries(tasks)) {
    if (!m.n) continue;
    const kind = "accuracy" in m ? "classification" : "mae" in m ? "regression" : null;
    if (!kind) continue;
    const table = el("table", { class: "metrics" },
                     el("caption", {}, `${name} (${kind}, ${m.n} subjects)`),
                     el("tr", {}, el("th", {}, "metric"), el("th", {}, "value"),
                        el("th", {}, "95% CI"), el("th", {}, "baseline")));
    for (const key of METRICS[kind]) {
      const ci = (m.ci || {})[key];
      table.append(el("tr", {}, el("td", {}, key), el("td", {}, fmt(m[key])),
                      el("td", {}, ci ? `[${fmt(ci[0])}, ${fmt(ci[1])}]` : "n/a"),
                      el("td", {}, fmt((m.baseline || {})[key]))));
    }
    box.append(table);
  }
}

function renderRows() {
  const body = $("eval-table").querySelector("tbody");
  body.replaceChildren();
  for (const r of state.rows) {
    const correct = r.correct === null || r.correct === undefined
      ? (r.abs_error !== null && r.abs_error !== undefined ? `|err| ${fmt(r.abs_error)}` : "")
      : r.correct ? "yes" : "no";
    const tr = el("tr", { class: r.correct === false ? "wrong" : "", "data-id": r.id },
                  el("td", {}, r.subject_id), el("td", {}, r.task),
                  el("td", {}, r.modalities.join("+")), el("td", {}, String(r.reference)),
                  el("td", {}, String(r.answer)), el("td", {}, fmt(r.confidence)),
                  el("td", {}, correct));
    tr.onclick = () => openRecord(r, tr);
    body.append(tr);
  }
}

function sortBy(key) {
  state.sortUp = state.sortKey === key ? !state.sortUp : true;
  state.sortKey = key;
  const sign = state.sortUp ? 1 : -1;
  const value = (r) => (Array.isArray(r[key]) ? r[key].join("+") : r[key]);
  state.rows.sort((a, b) => {
    const x = value(a), y = value(b);
    if (x === y) return 0;
    if (x === null || x === undefined) return 1;
    if (y === null || y === undefined) return -1;
    return (x < y ? -1 : 1) * sign;
  });
  renderRows();
}

async function openRecord(row, tr) {
  if (!row.can_open) { addError(`the scans of ${row.id} are not available on this server`); return; }
  document.querySelectorAll("#eval-table tr.selected").forEach((t) => t.classList.remove("selected"));
  tr.classList.add("selected");
  try {
    const opened = await api("api/eval/open", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ record_id: row.id }) });
    await showScan(opened.scans[0]);
    const task = state.info.tasks && state.info.tasks[row.task];
    if (task && task.questions.length) $("question").value = task.questions[0];
  } catch (err) {
    addError(`${row.id}: ${err.message}`);
  }
}

async function loadEvaluation() {
  const ev = await api("api/eval");
  $("eval-panel").hidden = false;
  $("eval-split").textContent = `split ${ev.split}, scoring ${ev.scoring}, ${ev.rows.length} predictions, wrong first`;
  $("eval-note").textContent = ev.note || "Click a row to open its scan.";
  metricsTable(ev.tasks);
  for (const name of ev.plots) {
    $("eval-plots").append(el("img", { src: withToken(`api/eval/plots/${name}`), alt: name, title: name }));
  }
  state.rows = ev.rows;
  renderRows();
  document.querySelectorAll("#eval-table th[data-key]").forEach((th) => {
    th.onclick = () => sortBy(th.dataset.key);
  });
}

// ---------------------------------------------------------------- start

async function main() {
  const info = await api("api/info");
  state.info = info;
  $("model-name").textContent = info.model;
  for (const m of info.modalities) $("modality").append(el("option", { value: m }, m));
  renderTasks(info);
  await initViewer();
  $("ask-form").addEventListener("submit", ask);
  $("file").addEventListener("change", (e) => { if (e.target.files[0]) upload(e.target.files[0]); });
  $("show-input").addEventListener("change", (e) => {
    if (state.nv.volumes.length > 1) state.nv.setOpacity(1, e.target.checked ? 0.6 : 0);
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) upload(e.dataTransfer.files[0]);
  });
  if (info.evaluation) await loadEvaluation();
  document.body.dataset.ready = "1";
}

main().catch((err) => addError(`the page could not start: ${err.message}`));
