// The playground page: plays a member of the local Discord server through its control API.
// Everything shown comes from other people (user names, prompts, the bot's replies), so text goes
// in with textContent, or through escapeHtml where the little Markdown needs markup.
"use strict";
let world = null, channelId = null, userId = null, commands = [];
const $ = (id) => document.getElementById(id);

// The control API wants the per-run token the server printed as this page's #token=... fragment.
// Keep it for reloads of this tab only, and take it out of the address bar and history.
const TOKEN_KEY = "sdbot-control-token";
const controlToken = (() => {
  const fromUrl = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromUrl) {
    sessionStorage.setItem(TOKEN_KEY, fromUrl);
    history.replaceState(null, "", location.pathname + location.search);
  }
  return fromUrl || sessionStorage.getItem(TOKEN_KEY) || "";
})();
// Pasting the printed address into a tab that already shows the page changes only the fragment,
// which does not reload it: start over with the new token.
window.addEventListener("hashchange", () => { if (new URLSearchParams(location.hash.slice(1)).get("token")) location.reload(); });
const NO_TOKEN = "This page needs the address sdbot playground printed (it ends in #token=...): open that one.";

async function send(path, init) {
  const res = await fetch(path, {...init, headers: {...(init.headers || {}), Authorization: `Bearer ${controlToken}`}});
  const data = await res.json().catch(() => ({}));
  if (res.status === 401) throw new Error(NO_TOKEN);
  if (!res.ok) throw new Error(data.message || res.statusText);
  return data;
}

function api(path, body) {
  return send(path, body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
}

// For the few places that build markup: every character that could end a text node or a quoted
// attribute value is replaced, so the result is only ever text.
function escapeHtml(text) {
  return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

// Only web addresses (absolute http(s) or relative to this page) may go into src or href.
function safeUrl(url) {
  try {
    const u = new URL(url, location.href);
    return u.protocol === "http:" || u.protocol === "https:" ? u.href : "";
  } catch { return ""; }
}

// What is being typed: the command, then any subcommand group and subcommand ("/config channels
// list"), as far as the words name them. The server (commands.py) reads the whole line the same
// way and parses the options; here it only picks attachment options, suggestions and the help.
function leafOf(text) {
  const line = text.trimStart(), m = line.match(/^\/?(\S+)/);
  if (!m) throw new Error("Type a command such as /imagine prompt: a red fox");
  const cmd = commands.find((c) => c.name === m[1] && (c.type || 1) === 1);
  if (!cmd) throw new Error(`Unknown command /${m[1]}`);
  let declared = cmd.options || [], rest = line.slice(m[0].length), path = [cmd.name];
  for (;;) {
    const subs = declared.filter((o) => o.type === 1 || o.type === 2);
    const word = rest.match(/^\s*(\S+)/);
    const sub = subs.length && word && subs.find((o) => o.name === word[1].toLowerCase());
    if (!sub) return {cmd, path: path.join(" "), declared: subs.length ? [] : declared, subs, rest};
    path.push(sub.name); declared = sub.options || []; rest = rest.slice(word[0].length);
  }
}

// The option whose value is being typed: the last known `name:` (matched as the server does).
function focusedOption(leaf) {
  let found = null;
  for (const o of leaf.declared) {
    const re = new RegExp(`(?:^|\\s)${o.name.replace(/[^\w-]/g, "")}:`, "gi");
    for (const h of leaf.rest.matchAll(re)) if (!found || h.index > found.at) found = {opt: o, at: h.index};
  }
  return found;
}

// Follow the newest message, as Discord does, until the person scrolls up to read; scrolling
// back down (or sending a command) follows again.
let follow = true, lastCount = 0;
const nearBottom = (log) => log.scrollHeight - log.scrollTop - log.clientHeight < 60;
function toNewest() { const log = $("log"); log.scrollTop = log.scrollHeight; follow = true; $("jump").hidden = true; }

// Generated pictures can be tiny (shown enlarged, pixel by pixel); charts are wide (shown
// smaller). Either way a click opens the picture at full size.
const SMALL = 256, LARGE = 560;
function picture(att, src) {
  const img = document.createElement("img"); img.src = src; img.alt = att.filename; img.title = "Click to see it full size";
  if (att.width && att.height) {  // reserve the space now, so the log does not jump as it loads
    const w = Math.min(Math.max(att.width, SMALL), LARGE);
    img.width = w; img.height = Math.round(w * att.height / att.width);
    if (att.width < SMALL) img.className = "small";
  }
  img.onload = () => { if (follow) toNewest(); };
  img.onclick = () => showFull(src, att.filename);
  return img;
}

function showFull(src, name) {
  $("fullimg").src = src; $("fullimg").alt = name; $("fullopen").href = src;
  $("lightbox").showModal();
}

const BUTTON_STYLES = {1: "primary", 3: "success", 4: "danger"};

let lastRendered = "";
function render(messages) {
  // Re-render only when something changed, so elements a person is about to click stay put.
  const snapshot = JSON.stringify(messages);
  if (snapshot === lastRendered) return;
  const grew = lastRendered !== "" && messages.length > lastCount;
  lastRendered = snapshot; lastCount = messages.length;
  const log = $("log"), keep = log.scrollTop;
  log.innerHTML = "";
  for (const msg of messages) {
    const div = document.createElement("div");
    div.className = "msg" + (msg.flags & 64 ? " ephemeral" : "");
    div.dataset.id = msg.id;
    const who = document.createElement("span"); who.className = "who"; who.textContent = msg.author.username;
    const meta = document.createElement("span"); meta.className = "meta";
    meta.textContent = (msg.flags & 64 ? "only you can see this · " : "") + (msg.interaction_metadata ? `used by ${msg.interaction_metadata.user.username}` : "");
    const content = document.createElement("div"); content.className = "content";
    content.innerHTML = msg.flags & 128 ? "sdbot is thinking…" : markdown(msg.content);
    div.append(who, meta, content);
    for (const att of msg.attachments) {
      const src = safeUrl(att.url);
      if (src && (att.content_type || "").startsWith("image/")) div.append(picture(att, src));
    }
    for (const row of msg.components || []) for (const comp of row.components || []) {
      if (comp.type !== 2 || !comp.custom_id) continue;
      const b = document.createElement("button"); b.disabled = !!comp.disabled;
      b.className = BUTTON_STYLES[comp.style] || "";
      const emoji = comp.emoji && !comp.emoji.id ? comp.emoji.name : "";  // custom emoji have no picture here
      b.textContent = [emoji, comp.label].filter(Boolean).join(" ") || "•";
      b.onclick = () => click(msg.id, comp.custom_id);
      div.append(b);
    }
    if (msg.attachments.length) div.oncontextmenu = (ev) => showMenu(ev, msg.id);
    log.append(div);
  }
  if (follow) toNewest();
  else { log.scrollTop = keep; if (grew) $("jump").hidden = false; }
}

// The little Markdown Discord shows: mentions, **bold**, `code`, [links](url), -# small.
// It works on escaped text (quotes included), and names looked up by id are escaped as well, so
// the only tags in the result are the ones written here.
function markdown(text) {
  return escapeHtml(text)
    .replace(/&lt;@(\d+)&gt;/g, (_, id) => `<b>@${escapeHtml(nameOf(id))}</b>`)
    .replace(/&lt;#(\d+)&gt;/g, (_, id) => `<b>#${escapeHtml((world.channels.find((c) => c.id === id) || {name: "channel"}).name)}</b>`)
    .replace(/\*\*(.+?)\*\*/g, "<b>$1</b>")
    .replace(/`([^`]+)`/g, "<code>$1</code>")
    .replace(/\[([^\]]+)\]\((https?:[^)\s]+)\)/g, '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>')
    .replace(/^-# (.*)$/gm, "<small>$1</small>");
}

function nameOf(id) {
  for (const u of Object.values(world.users)) if (u.id === id) return u.username;
  return "user";
}

async function refresh() {
  try { render(await api(`/_control/channels/${channelId}/messages?viewer=${userId}`)); } catch (e) { $("status").textContent = e.message; }
}

async function click(messageId, customId) {
  try { handleModal(await api("/_control/components", {user_id: userId, message_id: messageId, custom_id: customId})); } catch (e) { $("status").textContent = e.message; }
}

// A modal the bot opened (interaction answered with type 9): show it, submit what was typed.
function handleModal(sent) {
  const modal = sent && sent.interaction && sent.interaction.modal;
  if (!modal) return;
  $("modaltitle").textContent = modal.title;
  const fields = $("modalfields"); fields.innerHTML = "";
  for (const row of modal.components) for (const c of row.components) {
    const label = document.createElement("label"); label.textContent = c.label;
    const input = document.createElement(c.style === 2 ? "textarea" : "input");
    input.name = c.custom_id; input.value = c.value || ""; input.required = c.required !== false;
    fields.append(label, input);
  }
  $("modal").onclose = async () => {
    if ($("modal").returnValue !== "ok") return;
    const values = {};
    for (const el of fields.querySelectorAll("input, textarea")) values[el.name] = el.value;
    try { await api("/_control/modals", {interaction_id: sent.interaction.id, values, wait: false}); refresh(); } catch (e) { $("status").textContent = e.message; }
  };
  $("modal").showModal();
}

let uploads = [];
async function uploadFiles() {
  uploads = [];
  for (const file of $("file").files) {
    const query = `filename=${encodeURIComponent(file.name)}&content_type=${encodeURIComponent(file.type)}`;
    const headers = {"Content-Type": file.type || "application/octet-stream"};
    try { uploads.push(await send(`/_control/attachments?${query}`, {method: "POST", headers, body: file})); } catch (e) { $("status").textContent = `${file.name}: ${e.message}`; }
  }
  $("files").textContent = uploads.length ? "Attached: " + uploads.map((u) => u.filename).join(", ") : "";
}

// Autocomplete: the option being typed, if the bot offers suggestions for it.
let suggestTimer = null;
function suggest() {
  clearTimeout(suggestTimer);
  suggestTimer = setTimeout(async () => {
    $("suggest").innerHTML = "";
    const text = $("cmd").value;
    let leaf; try { leaf = leafOf(text); } catch { showOptions(null); return; }
    showOptions(leaf);
    const focused = focusedOption(leaf);
    if (!focused || !focused.opt.autocomplete) return;
    const name = focused.opt.name;
    try {
      // The server reads the half-typed line as commands.py does; the focused value is its tail.
      const {choices} = await api("/_control/autocomplete", {user_id: userId, channel_id: channelId, command: text, focused: name, options: {}});
      for (const ch of choices) {
        const b = document.createElement("button"); b.type = "button"; b.textContent = ch.name;
        b.onclick = () => {
          const at = text.length - leaf.rest.length + focused.at;
          $("cmd").value = text.slice(0, at).trimEnd() + ` ${name}: ${ch.value} `;
          $("suggest").innerHTML = ""; $("cmd").focus();
        };
        $("suggest").append(b);
      }
    } catch (e) { /* suggestions are best effort */ }
  }, 200);
}

// The help lists what can follow the command typed so far (/imagine's options for an empty line).
function showOptions(leaf) {
  if (!leaf) { try { leaf = leafOf("/imagine"); } catch { return; } }
  const names = (leaf.subs.length ? leaf.subs : leaf.declared).map((o) => o.name);
  $("optswhat").textContent = leaf.subs.length ? `Subcommands of /${leaf.path}: ` : `Options of /${leaf.path}: `;
  $("opts").textContent = names.join(", ") || "none";
}

function showMenu(ev, messageId) {
  ev.preventDefault();
  const menu = $("menu"); menu.innerHTML = "";
  for (const c of commands.filter((c) => c.type === 3)) {
    const item = document.createElement("div"); item.textContent = c.name;
    item.onclick = async () => {
      menu.style.display = "none";
      try { handleModal(await api("/_control/context_menu", {user_id: userId, message_id: messageId, name: c.name})); refresh(); } catch (e) { $("status").textContent = e.message; }
    };
    menu.append(item);
  }
  menu.style.left = ev.clientX + "px"; menu.style.top = ev.clientY + "px"; menu.style.display = "block";
}
document.addEventListener("click", () => { $("menu").style.display = "none"; });

async function init() {
  world = await api("/_control/world");
  commands = world.commands;
  channelId = world.channels[0].id;
  userId = world.member_id;
  for (const [name, u] of Object.entries(world.users)) {
    const o = document.createElement("option"); o.value = u.id; o.textContent = name + (u.id === world.admin_id ? " (admin)" : ""); $("user").append(o);
  }
  $("user").value = userId;
  $("user").onchange = () => { userId = $("user").value; lastRendered = ""; follow = true; refresh(); };
  for (const ch of world.channels) {
    const d = document.createElement("div"); d.className = "chan" + (ch.id === channelId ? " active" : ""); d.textContent = "# " + ch.name;
    d.onclick = () => { channelId = ch.id; document.querySelectorAll(".chan").forEach((x) => x.classList.remove("active")); d.classList.add("active"); lastRendered = ""; follow = true; refresh(); };
    $("channels").append(d);
  }
  showOptions(null);
  $("form").onsubmit = async (ev) => {
    ev.preventDefault();
    $("status").textContent = "";
    try {
      // The whole line goes to the server, which reads it as Discord's client would (commands.py);
      // uploads fill the attachment options in order, unless typed.
      const text = $("cmd").value, options = {};
      let leaf; try { leaf = leafOf(text); } catch { commands = (await api("/_control/world")).commands; leaf = leafOf(text); }
      leaf.declared.filter((o) => o.type === 11).forEach((o, i) => { if (uploads[i]) options[o.name] = uploads[i].id; });
      $("send").disabled = true;
      const sent = await api("/_control/interactions", {user_id: userId, channel_id: channelId, command: text, options});
      $("cmd").value = ""; $("suggest").innerHTML = ""; $("file").value = ""; uploads = []; $("files").textContent = "";
      toNewest();
      handleModal(sent);
      refresh();
    } catch (e) { $("status").textContent = e.message; }
    $("send").disabled = false;
  };
  $("log").addEventListener("scroll", () => { follow = nearBottom($("log")); if (follow) $("jump").hidden = true; });
  $("jump").onclick = toNewest;
  $("lightbox").onclick = (ev) => { if (ev.target.id !== "fullopen") $("lightbox").close(); };
  $("cmd").oninput = suggest;
  $("file").onchange = uploadFiles;
  refresh();
  setInterval(refresh, 700);
}
if (!controlToken) $("status").textContent = NO_TOKEN;
else init().catch((e) => { $("status").textContent = "Could not reach the local server: " + e.message; });
