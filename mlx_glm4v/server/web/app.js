// The chat page of `mlx-glm4v serve`: plain JavaScript, no build step, no request but to this server.
// It streams /v1/chat/completions (OpenAI's SSE format: `reasoning_content` deltas are the thinking,
// `content` the answer, `usage` at the end), keeps the conversation, and draws the boxes and points
// of each reply over the image they refer to. Boxes come from the server's `boxes` field when it sends
// one; otherwise the reply text is parsed here the same way mlx_glm4v/grounding.py parses it.
// A PDF goes as a chat-completions `file` part; the server renders its pages (each page an image).
"use strict";

window.glm4v = (() => {
  const COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324",
    "#800000", "#469990", "#000075", "#bfef45"];
  const SCALE = 1000;

  // ---- grounding: the text forms GLM-V uses, in thousandths of the image (see grounding.py) ----
  const BOX_RE = /<\|begin_of_box\|>([\s\S]*?)<\|end_of_box\|>/g;
  const NUMS = String.raw`\[[-+0-9.eE,\s]*\]`;
  const BARE_RE = new RegExp(String.raw`\[\s*${NUMS}(?:\s*,\s*${NUMS})*\s*\]`, "g");
  const THINK_RE = /<think>[\s\S]*?(?:<\/think>|$)/g;
  const ORDINALS = { first: 1, second: 2, third: 3, fourth: 4, fifth: 5, sixth: 6, seventh: 7, eighth: 8,
    ninth: 9, tenth: 10, "1st": 1, "2nd": 2, "3rd": 3 };
  const IMAGE_REF_RE = new RegExp(String.raw`\b(?:(?:image|picture|photo|img)\s*#?\s*(\d+)|(` +
    Object.keys(ORDINALS).join("|") + String.raw`|\d+th)\s+(?:image|picture|photo))\b`, "gi");
  // "Nose: [250,600]", "- **cat**: [[...]]": a short name and a colon just before the coordinates
  const HEADING_RE = /([^\n.;:!?<>\[\]{}]{1,40}):\s*$/;
  const HEADING_TRIM_RE = /^[\s*_\-•#]+|[\s*_\-•#]+$/g;
  const BOX_KEYS = ["bbox_2d", "box_2d", "bbox", "box"];
  const POINT_KEYS = ["point_2d", "point"];
  const LABEL_KEYS = ["label", "name", "text"];
  const MARKERS_RE = /<\|begin_of_box\|>|<\|end_of_box\|>|<\/?answer>/g;

  const blank = (text, start, end) => text.slice(0, start) + " ".repeat(end - start) + text.slice(end);
  const short = (s) => { s = s.trim().split(/\s+/).join(" "); return s.length <= 60 ? s : s.slice(0, 59) + "…"; };
  const isNumber = (v) => typeof v === "number" && Number.isFinite(v);

  // End of the JSON value that starts at `start` (a bracket or brace), strings respected; -1 if unclosed.
  function jsonEnd(text, start) {
    let depth = 0, inString = false;
    for (let i = start; i < text.length; i++) {
      const c = text[i];
      if (inString) {
        if (c === "\\") i++;
        else if (c === '"') inString = false;
      } else if (c === '"') inString = true;
      else if (c === "[" || c === "{") depth++;
      else if (c === "]" || c === "}") { if (--depth === 0) return i + 1; }
    }
    return -1;
  }

  function hasKeys(v) {
    if (Array.isArray(v)) return v.some(hasKeys);
    return v !== null && typeof v === "object" && [...BOX_KEYS, ...POINT_KEYS].some((k) => k in v);
  }

  function toMark(coords, label, raw) {
    if (!Array.isArray(coords) || ![2, 4].includes(coords.length) || !coords.every(isNumber))
      return `'${short(JSON.stringify(coords))}' in '${short(raw)}' is neither a box [x1,y1,x2,y2] nor a point [x,y].`;
    const bad = coords.find((v) => v < 0 || v > SCALE);
    if (bad !== undefined) return `'${short(raw)}' has ${bad}, outside the 0-${SCALE} range of GLM-V coordinates.`;
    if (coords.length === 4) {
      const [x1, y1, x2, y2] = coords;
      coords = [Math.min(x1, x2), Math.min(y1, y2), Math.max(x1, x2), Math.max(y1, y2)];
    }
    return { type: coords.length === 4 ? "box" : "point", coords, label, image: null };
  }

  function fromJson(value, raw) {
    if (value !== null && typeof value === "object" && !Array.isArray(value)) value = [value];
    if (Array.isArray(value) && value.length && value.every(isNumber)) value = [value];
    if (!Array.isArray(value) || !value.length) return [`'${short(raw)}' is not a list of coordinates.`];
    const out = [];
    for (let item of value) {
      let label = null;
      if (item !== null && typeof item === "object" && !Array.isArray(item)) {
        const lk = LABEL_KEYS.find((k) => ["string", "number"].includes(typeof item[k]));
        label = lk === undefined ? null : String(item[lk]);
        const key = [...BOX_KEYS, ...POINT_KEYS].find((k) => k in item);
        if (key === undefined) continue;
        item = item[key];
      }
      out.push(toMark(item, label, raw));
    }
    return out;
  }

  function payload(raw) {
    try { return fromJson(JSON.parse(raw), raw); } catch (e) { return [`'${short(raw)}' is not a list of coordinates.`]; }
  }

  function heading(text) {
    const m = HEADING_RE.exec(text);
    const label = m ? m[1].replace(HEADING_TRIM_RE, "") : "";
    return label && label.split(/\s+/).length <= 5 && !label.match(IMAGE_REF_RE) ? label : null;
  }

  function imageRef(text) {
    let last = null;
    for (const m of text.matchAll(IMAGE_REF_RE)) last = m;
    if (!last) return null;
    if (last[1]) return parseInt(last[1], 10) || null;
    const word = last[2].toLowerCase();
    return ORDINALS[word] || parseInt(word, 10) || null;
  }

  // The boxes and points of a reply's answer (thinking skipped): {marks, refused}.
  function parseMarks(text) {
    text = text.replace(THINK_RE, (m) => " ".repeat(m.length));
    const found = [];
    let plain = text;
    for (const m of text.matchAll(BOX_RE)) {
      found.push([m.index, m.index + m[0].length, payload(m[1].trim())]);
      plain = blank(plain, m.index, m.index + m[0].length);
    }
    let at = 0;
    for (;;) {
      const candidates = [plain.indexOf("[", at), plain.indexOf("{", at)].filter((i) => i >= 0);
      if (!candidates.length) break;
      const start = Math.min(...candidates), end = jsonEnd(plain, start);
      let value;
      try { value = end > 0 ? JSON.parse(plain.slice(start, end)) : undefined; } catch (e) { value = undefined; }
      if (value !== undefined && hasKeys(value)) {
        found.push([start, end, fromJson(value, plain.slice(start, end))]);
        plain = blank(plain, start, end);
        at = end;
      } else at = start + 1;
    }
    for (const m of plain.matchAll(BARE_RE)) found.push([m.index, m.index + m[0].length, payload(m[0])]);
    found.sort((a, b) => a[0] - b[0]);
    const marks = [], refused = [];
    let image = null;
    at = 0;
    for (const [start, end, items] of found) {
      image = imageRef(text.slice(at, start)) || image;
      const label = heading(text.slice(at, start));
      at = end;
      for (const item of items) {
        if (typeof item === "string") refused.push(item);
        else { item.image = image; item.label = item.label ?? label; marks.push(item); }
      }
    }
    return { marks, refused };
  }

  // The server's `boxes` field in the form parseMarks gives.
  const fromServer = (boxes) => boxes.map((b) => ({ type: b.type, coords: b.coords, label: b.label ?? null, image: b.image ?? null }));

  // ---- drawing: an SVG in thousandths stretched over the image, so it scales with any view ----
  const SVG = "http://www.w3.org/2000/svg";

  function renderOverlay(figure, marks) {
    figure.querySelectorAll(".overlay").forEach((e) => e.remove());
    figure.marks = marks;
    if (!marks.length) return null;
    const layer = document.createElement("div");
    layer.className = "overlay";
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", `0 0 ${SCALE} ${SCALE}`);
    svg.setAttribute("preserveAspectRatio", "none");
    layer.append(svg);
    for (const m of marks) {
      const color = COLORS[m.n % COLORS.length];
      const [x, y] = m.coords;
      if (m.type === "box") {
        const r = document.createElementNS(SVG, "rect");
        const [, , x2, y2] = m.coords;
        for (const [k, v] of Object.entries({ x, y, width: x2 - x, height: y2 - y })) r.setAttribute(k, v);
        r.setAttribute("stroke", color);
        r.dataset.n = m.n;
        svg.append(r);
      } else {
        const dot = document.createElement("span");
        dot.className = "point";
        dot.style.left = `${x / 10}%`;
        dot.style.top = `${y / 10}%`;
        dot.style.borderColor = color;
        dot.dataset.n = m.n;
        layer.append(dot);
      }
      const tag = document.createElement("span");
      tag.className = "tag" + (m.type === "box" && y < 60 ? " inside" : "");
      tag.textContent = m.label || String(m.n + 1);
      tag.style.left = `${x / 10}%`;
      tag.style.top = `${y / 10}%`;
      tag.style.background = color;
      layer.append(tag);
    }
    figure.append(layer);
    return layer;
  }

  // ---- the conversation ----
  const $ = (id) => document.getElementById(id);
  // options: extra request fields (max_tokens, temperature, ...) sent with every message
  const state = { model: null, options: {}, messages: [], pending: [], controller: null, figures: [], turns: [] };

  function element(tag, className, text) {
    const e = document.createElement(tag);
    if (className) e.className = className;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function mediaFigure(item) {
    const figure = element("figure", "media");
    if (item.kind === "pdf") {
      figure.classList.add("pdf");
      const pages = item.pages === null ? "PDF" : `${item.pages} page${item.pages === 1 ? "" : "s"}`;
      figure.append(element("span", "doc-icon", "PDF"), element("span", "doc-name", item.name),
        element("span", "doc-pages", pages));
    } else if (item.kind === "image") {
      const img = element("img");
      img.src = item.url;
      img.alt = item.name;
      figure.append(img);
      figure.addEventListener("click", () => openViewer(figure));
    } else {
      const video = element("video");
      video.src = item.url;
      video.controls = true;
      video.muted = true;
      video.preload = "metadata";
      figure.append(video);
    }
    figure.title = item.name;
    return figure;
  }

  function openViewer(figure) {
    const body = $("viewer-body");
    body.replaceChildren();
    const big = element("figure", "media full");
    const img = element("img");
    img.src = figure.querySelector("img").src;
    big.append(img);
    renderOverlay(big, figure.marks || []);
    body.append(big);
    $("viewer").showModal();
  }

  function scrollDown() { const c = $("conversation"); c.scrollTop = c.scrollHeight; }

  function addUserTurn(text, items) {
    $("empty").hidden = true;
    const bubble = element("div", "message user");
    const figures = [], slots = [];
    if (items.length) {
      const strip = element("div", "media-strip");
      for (const item of items) {
        const figure = mediaFigure(item);
        if (item.kind === "image") {
          state.figures.push(figure);
          figure.dataset.image = state.figures.length;
          figures.push(figure);
          slots.push(figure);
        } else if (item.kind === "pdf") {
          // each page is an image to the model, so the numbers replies use count them (one when the
          // count is unknown); a mark on a page has no picture here to go on
          for (let p = 0; p < (item.pages ?? 1); p++) { state.figures.push(figure); slots.push(figure); }
        }
        strip.append(figure);
      }
      bubble.append(strip);
    }
    if (text) bubble.append(element("div", "text", text));
    $("conversation").append(bubble);
    if (figures.length) state.turns.push(figures);
    bubble.figures = figures;
    bubble.slots = slots;
    scrollDown();
    return bubble;
  }

  function addReply() {
    const bubble = element("div", "message assistant");
    const thinking = element("details", "thinking");
    thinking.hidden = true;
    thinking.append(element("summary", null, "Thinking…"), element("div", "thinking-text"));
    bubble.append(thinking, element("div", "text"), element("div", "legend"), element("div", "stats"));
    $("conversation").append(bubble);
    scrollDown();
    return bubble;
  }

  // Thinking and answer of what has streamed so far; a server that does not separate thinking
  // sends it inline as <think>...</think>.
  function splitReply(reasoning, content) {
    let thinking = reasoning, answer = content;
    const open = answer.indexOf("<think>");
    if (open >= 0) {
      const close = answer.indexOf("</think>", open);
      thinking += answer.slice(open + 7, close < 0 ? undefined : close);
      answer = answer.slice(0, open) + (close < 0 ? "" : answer.slice(close + 8));
    }
    return { thinking: thinking.trim(), answer: answer.replace(MARKERS_RE, "").replace(/^\s+/, "") };
  }

  function showText(bubble, reasoning, content) {
    const { thinking, answer } = splitReply(reasoning, content);
    const details = bubble.querySelector(".thinking");
    details.hidden = !thinking;
    details.querySelector(".thinking-text").textContent = thinking;
    bubble.querySelector(".text").textContent = answer;
    return answer;
  }

  // Draw a finished reply's marks over the images they name (1-based over the conversation), the
  // others over the images of the latest turn that had some; list them under the reply.
  function showMarks(bubble, content, boxes) {
    const { marks, refused } = Array.isArray(boxes) ? { marks: fromServer(boxes), refused: [] } : parseMarks(content);
    marks.forEach((m, n) => { m.n = n; });
    const latest = state.turns.length ? state.turns[state.turns.length - 1] : [];
    drawMarks(marks, latest);
    const legend = bubble.querySelector(".legend");
    legend.replaceChildren();
    for (const m of marks) {
      const chip = element("span", "chip", `${m.label || m.n + 1} [${m.coords.join(", ")}]`);
      chip.style.borderColor = COLORS[m.n % COLORS.length];
      chip.title = "Show this reply's boxes on the image";
      chip.addEventListener("click", () => {
        state.figures.forEach((f) => renderOverlay(f, []));
        drawMarks(marks, latest);
      });
      legend.append(chip);
    }
    for (const r of refused) legend.append(element("span", "refused", `not drawn: ${r}`));
    return marks;
  }

  // Each image shows the marks of one reply at a time: the latest, or the one whose legend was clicked.
  function drawMarks(marks, latest) {
    const perFigure = new Map();
    for (const m of marks) {
      const named = m.image >= 1 && m.image <= state.figures.length;
      for (const f of named ? [state.figures[m.image - 1]] : latest) {
        if (f.classList.contains("pdf")) continue;
        if (!perFigure.has(f)) perFigure.set(f, []);
        perFigure.get(f).push(m);
      }
    }
    for (const [figure, ms] of perFigure) renderOverlay(figure, ms);
  }

  function showStats(bubble, t) {
    const parts = [];
    if (t.usage) {
      parts.push(`${t.usage.prompt_tokens} prompt tokens`, `${t.usage.completion_tokens} reply tokens`);
    } else if (t.chunks) parts.push(`≈${t.chunks} reply tokens`);
    const tokens = t.usage ? t.usage.completion_tokens : t.chunks;
    if (t.first !== null && t.end > t.first && tokens > 1)
      parts.push(`${((tokens - 1) / ((t.end - t.first) / 1000)).toFixed(1)} tokens/s`);
    if (t.first !== null) parts.push(`first token ${((t.first - t.start) / 1000).toFixed(2)} s`);
    if (t.finish) parts.push(t.finish === "length" ? "stopped at the token limit" : t.finish);
    bubble.querySelector(".stats").textContent = parts.join(" · ");
  }

  function showError(bubble, message) {
    const error = element("div", "error", message);
    bubble.append(error);
    scrollDown();
  }

  async function* events(body) {
    const reader = body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
        const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }

  async function errorMessage(response) {
    const text = await response.text();
    try { return JSON.parse(text).error.message || text; } catch (e) { return text || `${response.status} ${response.statusText}`; }
  }

  function setBusy(busy) {
    $("send").hidden = busy;
    $("stop").hidden = !busy;
  }

  async function send() {
    if (state.controller) return;
    const text = $("prompt").value.trim();
    const items = state.pending;
    if (!text && !items.length) return;
    $("prompt").value = "";
    autoGrow();
    state.pending = [];
    renderPending();
    const content = items.map((i) => i.kind === "image" ? { type: "image_url", image_url: { url: i.url } }
      : i.kind === "pdf" ? { type: "file", file: { file_data: i.url, filename: i.name } }
      : { type: "video_url", video_url: { url: i.url } });
    if (text) content.push({ type: "text", text });
    const userBubble = addUserTurn(text, items);
    const message = { role: "user", content };
    const history = state.messages; // "New chat" replaces it: a late end of this reply stays out of the next
    history.push(message);
    const bubble = addReply();
    const controller = state.controller = new AbortController();
    setBusy(true);
    const t = { start: performance.now(), first: null, end: null, usage: null, finish: null, chunks: 0 };
    let reasoning = "", raw = "", boxes = null, failed = null, stopped = false;
    try {
      const body = { ...state.options, messages: history, stream: true, stream_options: { include_usage: true } };
      if (state.model) body.model = state.model;
      const response = await fetch("v1/chat/completions", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal: controller.signal,
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      for await (const event of events(response.body)) {
        if (event.error) throw new Error(event.error.message || JSON.stringify(event.error));
        if (event.usage) t.usage = event.usage;
        const choice = (event.choices || [])[0];
        if (!choice) continue;
        const delta = choice.delta || {};
        if (delta.reasoning_content || delta.content) {
          t.first = t.first ?? performance.now();
          t.chunks++;
          reasoning += delta.reasoning_content || "";
          raw += delta.content || "";
          showText(bubble, reasoning, raw);
          scrollDown();
        }
        if (Array.isArray(delta.boxes)) boxes = delta.boxes;
        if (choice.finish_reason) t.finish = choice.finish_reason;
      }
    } catch (e) {
      if (e.name === "AbortError") stopped = true;
      else failed = e.message || String(e);
    }
    t.end = performance.now();
    state.controller = null;
    setBusy(false);
    const answer = showText(bubble, reasoning, raw);
    bubble.querySelector(".thinking summary").textContent = "Thinking";
    if (stopped) t.finish = "stopped";
    showStats(bubble, t);
    if (failed !== null) showError(bubble, failed);
    if (history !== state.messages) return;
    if (answer || reasoning) {
      history.push({ role: "assistant", content: answer });
      showMarks(bubble, raw, boxes);
    } else {
      history.splice(history.indexOf(message), 1); // nothing came back: not part of the history
      userBubble.classList.add("unsent");
      // its images were never seen by the model: out of the numbering replies refer to
      state.figures = state.figures.filter((f) => !userBubble.slots.includes(f));
      state.turns = state.turns.filter((t) => t !== userBubble.figures);
      state.figures.forEach((f, i) => { if (!f.classList.contains("pdf")) f.dataset.image = i + 1; });
    }
    bubble.classList.add(failed !== null ? "failed" : "done");
    $("prompt").focus();
  }

  function stop() { if (state.controller) state.controller.abort(); }

  function newChat() {
    stop();
    state.messages = [];
    state.figures = [];
    state.turns = [];
    state.pending = [];
    renderPending();
    $("conversation").querySelectorAll(".message").forEach((e) => e.remove());
    $("empty").hidden = false;
    $("prompt").focus();
  }

  // ---- attachments ----
  function readFile(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  // Attachments keep the order they were given in, however long each takes to read.
  let reading = Promise.resolve();
  function attach(files) {
    reading = reading.then(() => attachNow(files));
    return reading;
  }

  // The page count a PDF's page tree states: the largest /Count of its /Type /Pages objects (the root's).
  // null when the tree sits in compressed object streams; only the server's pdfium reads those.
  function pdfPages(bytes) {
    const text = new TextDecoder("latin1").decode(bytes);
    let most = null;
    for (const m of text.matchAll(/\bobj\b([\s\S]*?)\bendobj\b/g)) {
      if (!/\/Type\s*\/Pages(?![A-Za-z])/.test(m[1])) continue;
      const count = /\/Count\s+(\d+)/.exec(m[1]);
      if (count) most = Math.max(most ?? 0, parseInt(count[1], 10));
    }
    return most;
  }

  const kindOf = (file) => file.type.startsWith("image/") ? "image" : file.type.startsWith("video/") ? "video"
    : file.type === "application/pdf" || /\.pdf$/i.test(file.name) ? "pdf" : null;

  async function attachNow(files) {
    for (const file of files) {
      const kind = kindOf(file);
      if (!kind) { notice(`${file.name || "that file"} is not an image or a video, nor a PDF.`); continue; }
      try {
        const item = { kind, name: file.name || `pasted ${kind}`, url: await readFile(file) };
        if (kind === "pdf") {
          // the server knows a PDF by its bytes; the type the system gave (often none) is not sent
          item.url = "data:application/pdf;base64," + item.url.slice(item.url.indexOf(",") + 1);
          item.pages = pdfPages(await file.arrayBuffer());
        }
        state.pending.push(item);
      } catch (e) { notice(`${file.name} could not be read.`); }
    }
    renderPending();
  }

  function renderPending() {
    const box = $("attachments");
    box.replaceChildren();
    state.pending.forEach((item, i) => {
      const figure = mediaFigure(item);
      figure.classList.add("pending");
      const remove = element("button", "remove", "×");
      remove.type = "button";
      remove.title = `Remove ${item.name}`;
      remove.addEventListener("click", (e) => { e.stopPropagation(); state.pending.splice(i, 1); renderPending(); });
      figure.append(remove);
      box.append(figure);
    });
  }

  function notice(text) {
    const n = element("div", "notice", text);
    $("attachments").before(n);
    setTimeout(() => n.remove(), 5000);
  }

  function autoGrow() {
    const p = $("prompt");
    p.style.height = "auto";
    p.style.height = `${Math.min(p.scrollHeight, 200)}px`;
  }

  // A finished exchange shown without asking the server: the pending media and `prompt` as the user's
  // turn, `reply` as the answer, drawn by the same code as a streamed reply (for tests and screenshots).
  function addExchange(prompt, reply, boxes = null) {
    const items = state.pending;
    state.pending = [];
    renderPending();
    addUserTurn(prompt, items);
    const bubble = addReply();
    showText(bubble, "", reply);
    bubble.querySelector(".thinking summary").textContent = "Thinking";
    bubble.classList.add("done");
    return showMarks(bubble, reply, boxes);
  }

  async function init() {
    $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
    $("stop").addEventListener("click", stop);
    $("new-chat").addEventListener("click", newChat);
    $("file").addEventListener("change", async (e) => { await attach([...e.target.files]); e.target.value = ""; });
    $("prompt").addEventListener("input", autoGrow);
    $("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
    });
    document.addEventListener("paste", (e) => {
      const files = [...(e.clipboardData?.files || [])];
      if (files.length) { e.preventDefault(); attach(files); }
    });
    let depth = 0;
    document.addEventListener("dragenter", (e) => { e.preventDefault(); depth++; $("drop-hint").hidden = false; });
    document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; $("drop-hint").hidden = true; } });
    document.addEventListener("dragover", (e) => e.preventDefault());
    document.addEventListener("drop", (e) => {
      e.preventDefault();
      depth = 0;
      $("drop-hint").hidden = true;
      attach([...(e.dataTransfer?.files || [])]);
    });
    try {
      const response = await fetch("v1/models");
      if (response.ok) {
        const models = (await response.json()).data || [];
        if (models.length) { state.model = models[0].id; $("model").textContent = state.model; }
      }
    } catch (e) { /* the page still works: requests then name no model */ }
    document.body.dataset.ready = "1";
  }

  document.addEventListener("DOMContentLoaded", init);
  return { parseMarks, renderOverlay, addExchange, attach, send, stop, newChat, state, COLORS };
})();
