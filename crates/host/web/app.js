// The vstream web console: the guest list, one console or shell in xterm.js, the events pane.
// Console bytes are binary WebSocket messages both ways; control messages are JSON text
// (crates/host/src/web/frame.rs).
"use strict";

const FONT = { family: "monospace", size: 14 };
const term = new Terminal({
  fontFamily: FONT.family, fontSize: FONT.size, scrollback: 10000, convertEol: false,
});
term.open(document.getElementById("term"));
const state = { role: "", ws: null, writer: false, guest: "", console: "", ended: "" };
// For tests and the curious: the terminal and its text.
window.vstream = {
  term, fit,
  text: () => {
    const b = term.buffer.active, lines = [];
    for (let i = 0; i < b.length; i++) lines.push(b.getLine(i).translateToString(true));
    return lines.join("\n");
  },
  state,
};

// xterm.js core has no fit: size the grid from one character's box.
function fit() {
  const probe = document.createElement("span");
  probe.style.font = `${FONT.size}px ${FONT.family}`;
  probe.style.visibility = "hidden";
  probe.textContent = "W".repeat(50);
  document.body.appendChild(probe);
  const cw = probe.getBoundingClientRect().width / 50, ch = probe.getBoundingClientRect().height;
  probe.remove();
  const box = document.getElementById("term").getBoundingClientRect();
  const cols = Math.max(20, Math.floor((box.width - 8) / cw));
  const rows = Math.max(5, Math.floor((box.height - 8) / (ch * 1.05)));
  if (cols !== term.cols || rows !== term.rows) term.resize(cols, rows);
}
term.onResize(({ cols, rows }) => {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) {
    state.ws.send(JSON.stringify({ type: "resize", cols, rows }));
  }
});
window.addEventListener("resize", fit);
fit();

const encoder = new TextEncoder();
term.onData((data) => {
  if (state.writer && state.ws && state.ws.readyState === WebSocket.OPEN) {
    state.ws.send(encoder.encode(data));
  }
});
term.onBinary((data) => {
  if (state.writer && state.ws && state.ws.readyState === WebSocket.OPEN) {
    state.ws.send(Uint8Array.from(data, (c) => c.charCodeAt(0)));
  }
});

function wsUrl(path) {
  return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + path;
}

function setMode(text) {
  document.getElementById("mode").textContent = text;
  document.getElementById("take").hidden = !(state.role === "owner" && !state.writer && state.ws && state.console);
}

function openConsole(guest, name, take) {
  history.replaceState(null, "", `#${encodeURIComponent(guest)}/${encodeURIComponent(name)}`);
  const path = `/ws/console/${encodeURIComponent(guest)}/${encodeURIComponent(name)}` + (take ? "?take=true" : "");
  connect(guest, name, path);
}

// A login shell in the guest on a pty of this terminal's size; it ends with the shell.
function openShell(guest) {
  history.replaceState(null, "", "#");
  fit();
  connect(guest, "", `/ws/shell/${encodeURIComponent(guest)}?cols=${term.cols}&rows=${term.rows}`);
  document.getElementById("title").textContent = `${guest} / shell`;
}

function connect(guest, name, path) {
  if (state.ws) { state.ws.onclose = null; state.ws.close(); }
  state.guest = guest; state.console = name; state.writer = false; state.ended = "";
  document.getElementById("title").textContent = `${guest} / ${name}`;
  term.reset();
  const ws = new WebSocket(wsUrl(path));
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  setMode("connecting…");
  ws.onmessage = (e) => {
    if (typeof e.data !== "string") { term.write(new Uint8Array(e.data)); return; }
    const m = JSON.parse(e.data);
    if (m.type === "attached") {
      state.writer = m.writer;
      setMode(m.writer ? "typing" : "watching (another viewer types)");
      if (state.role !== "owner") setMode("watching (read-only token)");
      ws.send(JSON.stringify({ type: "resize", cols: term.cols, rows: term.rows }));
      term.focus();
    } else if (m.type === "error") {
      setMode(`error: ${m.error}`);
    } else if (m.type === "exit") {
      state.writer = false; state.ended = m.message;
      setMode(m.message);
    }
  };
  ws.onclose = () => { state.writer = false; if (!state.ended) setMode("disconnected"); };
}
document.getElementById("take").onclick = () => openConsole(state.guest, state.console, true);

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function guestState(status) {
  return status.connected ? "up" : "down";
}

async function refresh() {
  const r = await fetch("/api/guests");
  if (r.status === 401) { location.href = "/"; return; }
  const data = await r.json();
  state.role = data.role;
  document.getElementById("role").textContent = data.role === "owner" ? "owner" : "read-only";
  const list = document.getElementById("list");
  list.replaceChildren();
  for (const g of data.guests) {
    const name = g.status.name, s = guestState(g.status);
    const div = el("div", "guest");
    const head = el("div");
    head.append(el("span", "name", name), " ", el("span", `state-${s}`, s));
    div.append(head);
    for (const c of g.consoles) {
      const a = el("a", "", c);
      a.dataset.guest = name; a.dataset.console = c;
      a.onclick = () => openConsole(name, c, false);
      div.append(a);
    }
    if (data.role === "owner") {
      const a = el("a", "shell", "shell");
      a.dataset.guest = name;
      a.onclick = () => openShell(name);
      div.append(a);
    }
    list.append(div);
  }
  if (!state.ws && location.hash.length > 1) {
    const [guest, name] = location.hash.slice(1).split("/").map(decodeURIComponent);
    if (guest && name) openConsole(guest, name, false);
  }
  setMode(document.getElementById("mode").textContent);
}

function followEvents() {
  const pane = document.getElementById("events");
  const ws = new WebSocket(wsUrl("/ws/events"));
  ws.onmessage = (e) => {
    const ev = JSON.parse(e.data);
    const { event, guest, time, time_ms, ...rest } = ev; // eslint-disable-line no-unused-vars
    const when = time_ms ? new Date(time_ms).toISOString().slice(11, 19) : "";
    const line = `${when} ${guest || "-"} ${event} ${JSON.stringify(rest)}\n`;
    pane.textContent = (line + pane.textContent).slice(0, 20000);
    refresh();
  };
  ws.onclose = () => setTimeout(followEvents, 2000);
}

refresh();
setInterval(refresh, 5000);
followEvents();
