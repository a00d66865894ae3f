// fastsal report: sorting and filtering the rows of a page, and colouring its maps on canvases.
// Plain JavaScript, no build step; the page opens from disk (file://), so nothing is fetched.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const box = document.querySelector("[data-rows]");
  const indexData = $("index-data");
  // A record per image: its sort and filter keys, and its row (a page's are in the HTML; the index's are
  // made from its data as they are shown, so 10,000 images cost no 10,000 rows of HTML).
  const records = indexData
    ? JSON.parse(indexData.textContent).map((r) => ({ keys: r.keys, ids: r.ids, search: r.search, data: r, element: null }))
    : Array.from(box.children, (e) => ({
        keys: JSON.parse(e.dataset.keys), ids: JSON.parse(e.dataset.classes), search: e.dataset.search, element: e,
      }));
  const STEP = 500;  // index rows listed at a time
  let listed = STEP;

  function compare(a, b) {
    if (a === b) return 0;
    if (a === null || a === undefined) return 1;  // missing values last, either direction
    if (b === null || b === undefined) return -1;
    return typeof a === "string" ? a.localeCompare(b) : a - b;
  }

  function classMatches(record, text) {
    if (!text) return true;
    if (/^\d+$/.test(text)) return record.ids.includes(Number(text));
    return record.search.includes(text);
  }

  function select() {
    const key = $("sort-key").value;
    const sign = $("sort-dir").value === "desc" ? -1 : 1;
    const text = $("filter-class").value.trim().toLowerCase();
    const status = $("filter-status").value;
    const field = $("filter-field").value;
    const low = parseFloat($("filter-min").value);
    const high = parseFloat($("filter-max").value);
    const chosen = records.filter((r) => {
      const v = r.keys[field];
      const inRange = (isNaN(low) && isNaN(high)) ||
        (typeof v === "number" && (isNaN(low) || v >= low) && (isNaN(high) || v <= high));
      return inRange && (!status || r.keys.status === status) && classMatches(r, text);
    });
    return chosen.sort((a, b) => {
      const x = a.keys[key], y = b.keys[key];
      if (x === null || x === undefined || y === null || y === undefined) return compare(x, y) || a.keys.index - b.keys.index;
      return sign * compare(x, y) || a.keys.index - b.keys.index;
    });
  }

  function number(v) {
    return typeof v === "number" ? String(Number(v.toPrecision(4))) : "";
  }

  function indexRow(record) {  // a row of the index table, as the page's header names the columns
    const r = record.data;
    const tr = document.createElement("tr");
    tr.className = `row status-${r.keys.status}`;
    tr.dataset.index = r.keys.index;
    const add = (content, className) => {
      const td = tr.insertCell();
      if (className) td.className = className;
      td.append(...[].concat(content));
      return td;
    };
    add(String(r.keys.index), "num");
    const link = document.createElement("a");
    link.href = `${r.page}#i-${r.keys.index}`;
    link.title = r.path || "";
    link.textContent = r.name;
    add(link);
    const state = add(r.keys.status);
    if (r.reason) {
      const why = document.createElement("span");
      why.className = "reason";
      why.textContent = r.reason;
      state.append(": ", why);
    }
    add(r.names.join("; "));
    for (const key of JSON.parse(indexData.dataset.columns)) add(number(r.keys[key]), "num");
    return tr;
  }

  function apply() {
    const chosen = select();
    if (indexData) {
      for (const r of chosen.slice(0, listed)) r.element = r.element || indexRow(r);
      box.replaceChildren(...chosen.slice(0, listed).map((r) => r.element));
      $("more").hidden = chosen.length <= listed;
      $("shown").textContent = `${chosen.length} of ${records.length} match` +
        (chosen.length > listed ? `; the first ${listed} listed` : "");
      return;
    }
    const shown = new Set(chosen);
    const fragment = document.createDocumentFragment();
    for (const r of chosen) fragment.appendChild(r.element);
    for (const r of records) {
      r.element.hidden = !shown.has(r);
      if (r.element.hidden) fragment.appendChild(r.element);
    }
    box.appendChild(fragment);
    $("shown").textContent = `${chosen.length} of ${records.length} match`;
  }

  const more = $("more");
  if (more) more.addEventListener("click", () => { listed += STEP; apply(); });
  const again = () => { listed = STEP; apply(); };
  for (const id of ["sort-key", "sort-dir", "filter-status", "filter-field"]) $(id).addEventListener("change", again);
  for (const id of ["filter-class", "filter-min", "filter-max"]) $(id).addEventListener("input", again);
  const jump = $("goto");
  if (jump) jump.addEventListener("change", () => { location.href = jump.value; });

  // Maps: bytes q = 127 v / max|v| + 128, scaled by the map's own max|v| or the page's largest per store.
  const meta = window.FASTSAL_META;
  const canvases = Array.from(document.querySelectorAll("canvas.map"));
  const bytes = new Map();
  const pageMax = {};
  for (const c of canvases) {
    const s = c.dataset.store;
    pageMax[s] = Math.max(pageMax[s] || 0, parseFloat(c.dataset.max));
  }

  function lut(store) {
    return meta.luts[meta.signed[store] ? "diverging" : "sequential"];
  }

  function colour(v, signed) {  // v in units of the scale: the colour table's row
    return signed ? Math.round((Math.min(1, Math.max(-1, v)) + 1) * 127.5) : Math.round(Math.min(1, Math.max(0, v)) * 255);
  }

  function draw(canvas, mode) {
    if (!bytes.has(canvas)) {
      const raw = atob(canvas.dataset.q);
      bytes.set(canvas, Uint8Array.from(raw, (ch) => ch.charCodeAt(0)));
    }
    const q = bytes.get(canvas);
    const store = canvas.dataset.store;
    const signed = meta.signed[store];
    const own = parseFloat(canvas.dataset.max);
    const scale = mode === "page" ? pageMax[store] : own;
    const table = lut(store);
    const context = canvas.getContext("2d");
    const image = context.createImageData(canvas.width, canvas.height);
    for (let i = 0; i < q.length; i++) {
      const row = 3 * colour(scale > 0 ? ((q[i] - 128) / 127) * (own / scale) : 0, signed);
      image.data.set([table[row], table[row + 1], table[row + 2], 255], 4 * i);
    }
    context.putImageData(image, 0, 0);
  }

  function legend(mode) {
    const box = $("legend");
    if (!box) return;
    box.replaceChildren();
    meta.labels.forEach((label, store) => {
      const signed = meta.signed[store];
      const bar = document.createElement("canvas");
      bar.width = 256; bar.height = 1;
      const image = bar.getContext("2d").createImageData(256, 1);
      const table = lut(store);
      for (let i = 0; i < 256; i++) image.data.set([table[3 * i], table[3 * i + 1], table[3 * i + 2], 255], 4 * i);
      bar.getContext("2d").putImageData(image, 0, 0);
      const top = pageMax[store] ? pageMax[store].toPrecision(3) : "0";
      const item = document.createElement("span");
      item.className = "scale";
      if (mode === "page") item.append(`${label}: ${signed ? "−" + top : "0"}`, bar, top);
      else item.append(`${label}: ${signed ? "−max|v|" : "0"}`, bar, signed ? "+max|v| of each map" : "max of each map");
      box.appendChild(item);
    });
  }

  const scale = $("scale");
  function paint() {
    const mode = scale ? scale.value : "map";
    try { localStorage.setItem("fastsal-scale", mode); } catch (e) { /* storage off: the choice is per page */ }
    for (const c of canvases) draw(c, mode);
    legend(mode);
    document.body.dataset.scale = mode;
  }
  if (scale) {
    try { scale.value = localStorage.getItem("fastsal-scale") || "map"; } catch (e) { /* as above */ }
    scale.addEventListener("change", paint);
  }
  paint();
  apply();
  document.body.dataset.ready = "1";  // for the tests: the page has painted its maps and rows
})();
