/* Loa board player: the reference board client (docs/device-protocol.md, sections 3.4.1 and 9).
 *
 * Speaks the device protocol over the control WebSocket: hello, heartbeats, acks, reconnect with
 * back-off. Renders the display content model (items valid now, full or split layout, ticker)
 * and covers the screen with the emergency text. No dependencies, no network but this node and
 * the image/video URLs the operator names.
 */
"use strict";

(() => {
  const PROTOCOL = 1;
  const FIRMWARE = "loa-board-page/1";
  const LS = {device: "loa.board.device", key: "loa.board.key", content: "loa.board.content"};
  const DEFAULT_DWELL_S = 10;
  const MAX_SEEN = 500; // acks remembered to answer re-sent commands without executing them twice
  const BACKOFF_MAX_S = 60;
  const WEEKDAYS_VI = ["Chủ Nhật", "Thứ Hai", "Thứ Ba", "Thứ Tư", "Thứ Năm", "Thứ Sáu", "Thứ Bảy"];
  const TEXT = {
    connecting: "Đang kết nối… / Connecting…",
    retry: (s) => `Mất kết nối, thử lại sau ${s} giây / Disconnected, retrying in ${s} s`,
    login: "Nhập mã thiết bị và khóa của bảng tin / Enter the board's device id and key",
    4001: "Sai mã thiết bị hoặc khóa: cần cấp phát lại bảng tin này. / Unknown device or wrong " +
      "key: this board must be provisioned again. (4001)",
    4003: "Khóa của bảng tin đã bị thu hồi hoặc thiết bị đã bị xóa. / The board's key was " +
      "revoked or the device was deleted. (4003)",
    4009: "Một kết nối khác của bảng tin này đã thay thế trang này. / Another connection of " +
      "this board replaced this page. (4009)",
    noAudio: "bảng tin không phát âm thanh / this board plays no audio",
    emergency: "Thông báo khẩn cấp / Emergency alert",
  };

  const $ = (id) => document.getElementById(id);
  const el = {};

  const state = {
    device: "",
    key: "",
    name: "",
    ws: null,
    stopped: false,
    backoff: 1,
    reconnectTimer: 0,
    heartbeatTimer: 0,
    heartbeatS: 60,
    nextHeartbeat: 0,
    clockOffset: 0, // server time - local time, seconds (from welcome.server_time)
    content: null, // {layout, items, ticker}
    emergency: null, // {text, ...} while on
    power: true,
    seen: new Map(), // command id -> the ack sent
    regions: {},
    failed: new Set(), // signatures of items whose media failed to load
    tickerText: null,
  };

  // ---- storage (may be unavailable: private mode, kiosk policies) ---------------------------
  const store = {
    get(k) { try { return localStorage.getItem(k); } catch (_) { return null; } },
    set(k, v) { try { localStorage.setItem(k, v); } catch (_) { /* not kept */ } },
    del(k) { try { localStorage.removeItem(k); } catch (_) { /* nothing kept */ } },
  };

  function now() {
    return Date.now() / 1000 + state.clockOffset;
  }

  // ---- the content model -------------------------------------------------------------------
  /** The content a display command (or config.display) leaves on screen, or null. Mirrors
   *  display_state() in relay/control.py: the single-item form becomes items. */
  function normalize(args, t) {
    if (!args || typeof args !== "object") return null;
    let items;
    if (Array.isArray(args.items)) {
      items = args.items.filter((it) => it && typeof it === "object").map((it, i) => (
        {...it, id: typeof it.id === "string" && it.id ? it.id : `item-${i + 1}`}));
    } else {
      items = [];
      const visual = ["video", "image"].filter((k) => typeof args[k] === "string");
      for (const k of visual) items.push({id: k, type: k, url: args[k]});
      if (typeof args.text === "string") {
        const item = {id: "text", type: "text", text: args.text};
        if (args.layout === "split" && visual.length) item.region = "side";
        items.push(item);
      }
      if (typeof args.duration_s === "number") {
        for (const it of items) it.valid_to = t + args.duration_s;
      }
    }
    const ticker = typeof args.ticker === "string" && args.ticker ? args.ticker : null;
    if (!items.length && !ticker) return null;
    return {layout: args.layout === "split" ? "split" : "full", items, ticker};
  }

  function toEpoch(v) {
    if (v === undefined || v === null) return null;
    if (typeof v === "number") return v;
    if (typeof v === "string") {
      const ms = Date.parse(v);
      return Number.isNaN(ms) ? NaN : ms / 1000;
    }
    return NaN;
  }

  function minutes(hhmm) {
    const m = /^(\d\d):(\d\d)$/.exec(hhmm || "");
    return m ? Number(m[1]) * 60 + Number(m[2]) : NaN;
  }

  /** Is the item to be shown at epoch time t? valid_from <= t < valid_to, today in weekdays
   *  (1 = Monday), time of day in one of the [start, end) windows (over midnight when end <
   *  start). Local time of this browser. A malformed rule hides the item. */
  function isValid(item, t) {
    const from = toEpoch(item.valid_from);
    const to = toEpoch(item.valid_to);
    if (Number.isNaN(from) || Number.isNaN(to)) return false;
    if (from !== null && t < from) return false;
    if (to !== null && t >= to) return false;
    const d = new Date(t * 1000);
    if (Array.isArray(item.weekdays) && item.weekdays.length) {
      const wd = ((d.getDay() + 6) % 7) + 1;
      if (!item.weekdays.includes(wd)) return false;
    }
    if (Array.isArray(item.times) && item.times.length) {
      const m = d.getHours() * 60 + d.getMinutes() + d.getSeconds() / 60;
      const inside = item.times.some((w) => {
        if (!Array.isArray(w) || w.length !== 2) return false;
        const s = minutes(w[0]);
        const e = minutes(w[1]);
        if (Number.isNaN(s) || Number.isNaN(e)) return false;
        return s < e ? m >= s && m < e : m >= s || m < e;
      });
      if (!inside) return false;
    }
    return true;
  }

  function regionOf(item, layout) {
    return layout === "split" && item.region === "side" ? "side" : "main";
  }

  function dwell(item) {
    const d = Number(item.duration_s);
    return d >= 1 ? d : DEFAULT_DWELL_S;
  }

  // ---- rendering ---------------------------------------------------------------------------
  function signature(item) {
    return JSON.stringify(item);
  }

  function mediaFailed(sig) {
    if (!state.failed.has(sig)) {
      state.failed.add(sig);
      console.warn("loa board: media failed to load", sig);
    }
  }

  function makeItem(item, region, sig) {
    const box = document.createElement("div");
    box.className = `item ${item.type}`;
    box.dataset.id = item.id;
    if (item.type === "text") {
      const body = document.createElement("div");
      body.className = "text-body";
      if (typeof item.title === "string" && item.title) {
        const h = document.createElement("h1");
        h.textContent = item.title;
        body.appendChild(h);
      }
      if (item.scroll) {
        box.classList.add("scroll");
        const track = document.createElement("div");
        track.className = "marquee";
        const span = document.createElement("span");
        span.textContent = item.text || "";
        track.appendChild(span);
        body.appendChild(track);
      } else {
        const p = document.createElement("p");
        p.textContent = item.text || "";
        body.appendChild(p);
      }
      box.appendChild(body);
    } else if (item.type === "image") {
      const img = document.createElement("img");
      img.alt = "";
      img.decoding = "async";
      img.referrerPolicy = "no-referrer";
      img.addEventListener("error", () => mediaFailed(sig));
      img.src = new URL(item.url, location.href).href;
      box.appendChild(img);
    } else if (item.type === "video") {
      const v = document.createElement("video");
      v.muted = true; // sound is the loudspeakers' job; muted video may autoplay
      v.loop = true;
      v.playsInline = true;
      v.preload = "auto";
      v.setAttribute("muted", "");
      v.addEventListener("error", () => mediaFailed(sig));
      const url = new URL(item.url, location.href).href;
      if (/\.m3u8(\?|$)/i.test(url) && !v.canPlayType("application/vnd.apple.mpegurl")) {
        // No HLS player library offline: HLS needs a browser with native support.
        mediaFailed(sig);
      } else {
        v.src = url;
      }
      box.appendChild(v);
    }
    region.el.appendChild(box);
    return box;
  }

  function fitText(box) {
    const body = box.querySelector(".text-body");
    if (!body || !box.clientHeight) return;
    const style = getComputedStyle(box);
    const availH = box.clientHeight - parseFloat(style.paddingTop) - parseFloat(style.paddingBottom);
    const availW = box.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
    if (box.classList.contains("scroll")) {
      body.style.fontSize = `${Math.max(16, box.clientHeight * 0.3)}px`;
      setMarquee(body.querySelector(".marquee > span"));
      return;
    }
    fitInto(body, () => body.scrollHeight <= availH + 1 && body.scrollWidth <= availW + 1,
      Math.max(16, box.clientHeight * 0.16), 12);
  }

  /** The largest font size in [min, max] px for which fits() holds. */
  function fitInto(target, fits, max, min) {
    target.style.fontSize = `${max}px`;
    if (fits()) return;
    let lo = min;
    let hi = max;
    for (let i = 0; i < 14 && hi - lo > 0.5; i++) {
      const mid = (lo + hi) / 2;
      target.style.fontSize = `${mid}px`;
      if (fits()) lo = mid; else hi = mid;
    }
    target.style.fontSize = `${lo}px`;
  }

  function setMarquee(span) {
    if (!span) return;
    const speed = Math.max(60, window.innerHeight * 0.14); // px per second
    const seconds = Math.max(4, span.scrollWidth / speed);
    span.style.setProperty("--marquee-s", `${seconds.toFixed(2)}s`);
  }

  function activate(region, sig) {
    for (const [s, box] of region.boxes) {
      const on = s === sig;
      box.classList.toggle("active", on);
      const v = box.querySelector("video");
      if (v) {
        if (on) {
          const playing = v.play(); // a promise in current browsers, undefined in old ones
          if (playing && playing.catch) playing.catch(() => { /* refused or no source */ });
        } else {
          v.pause();
        }
      }
      if (on && box.classList.contains("text")) fitText(box);
    }
  }

  /** Show the valid items of one region: keep elements of items still valid, rotate. */
  function updateRegion(region, items, t) {
    const sigs = items.map(signature);
    for (const [s, box] of region.boxes) {
      if (!sigs.includes(s)) {
        const v = box.querySelector("video");
        if (v) { v.pause(); v.removeAttribute("src"); v.load(); }
        box.remove();
        region.boxes.delete(s);
      }
    }
    items.forEach((item, i) => {
      if (!region.boxes.has(sigs[i])) region.boxes.set(sigs[i], makeItem(item, region, sigs[i]));
    });
    let idx = sigs.indexOf(region.current);
    if (idx >= 0 && items.length > 1 && t - region.since >= dwell(items[idx])) {
      idx = (idx + 1) % items.length;
    } else if (idx < 0 && items.length) {
      idx = 0;
    }
    const next = idx >= 0 ? sigs[idx] : null;
    if (next !== region.current) {
      reportShown(region, t); // proof of play: the outgoing item's end ...
      region.current = next;
      region.since = t;
      activate(region, next);
      reportShown(region, t); // ... and the new one's start
    }
    return items.length > 0;
  }

  /** Proof of play (`shown`): the item a region shows, since when, seen at `at`. */
  function reportShown(region, at) {
    const box = region.boxes.get(region.current);
    if (!box || !box.dataset.id) return;
    send({type: "shown", item: box.dataset.id.slice(0, 64), region: region.name,
      since: region.since, at: Math.max(at, region.since)});
  }

  function setTicker(text) {
    if (text === state.tickerText) return;
    state.tickerText = text;
    el.tickerText.textContent = text || "";
    el.ticker.hidden = !text;
    el.board.classList.toggle("has-ticker", Boolean(text));
    if (text) requestAnimationFrame(() => setMarquee(el.tickerText));
  }

  function render() {
    const t = now();
    const c = state.content;
    const byRegion = {main: [], side: []};
    if (c) {
      for (const item of c.items) {
        if (item && typeof item === "object" && isValid(item, t)) {
          byRegion[regionOf(item, c.layout)].push(item);
        }
      }
    }
    el.board.dataset.layout = c ? c.layout : "full";
    setTicker(c ? c.ticker : null);
    const wasHidden = el.board.hidden;
    el.board.hidden = false; // elements are measured while laid out
    const main = updateRegion(state.regions.main, byRegion.main, t);
    const side = updateRegion(state.regions.side, byRegion.side, t);
    const any = main || side || Boolean(c && c.ticker);
    el.board.hidden = !any;
    el.idle.hidden = any;
    if (!any) renderIdle(t);
    if (wasHidden && any) refit();
  }

  function renderIdle(t) {
    const d = new Date(t * 1000);
    const pad = (n) => String(n).padStart(2, "0");
    el.idleClock.textContent = `${pad(d.getHours())}:${pad(d.getMinutes())}`;
    el.idleDate.textContent = `${WEEKDAYS_VI[d.getDay()]}, ${pad(d.getDate())}/` +
      `${pad(d.getMonth() + 1)}/${d.getFullYear()}`;
    el.idleName.textContent = state.name;
  }

  function refit() {
    for (const region of Object.values(state.regions)) {
      const box = region.boxes.get(region.current);
      if (box && box.classList.contains("text")) fitText(box);
    }
    if (state.tickerText) setMarquee(el.tickerText);
    if (state.emergency) fitEmergency();
  }

  function setContent(content, persist = true) {
    // The same content again (a reconnect's welcome): keep what failed to load as failed.
    if (JSON.stringify(content) !== JSON.stringify(state.content)) state.failed.clear();
    state.content = content;
    if (persist) {
      if (content) store.set(LS.content, JSON.stringify({device: state.device, content}));
      else store.del(LS.content);
    }
    render();
  }

  // ---- emergency overlay -------------------------------------------------------------------
  function fitEmergency() {
    const box = el.emergencyText;
    const body = el.emergencyBody;
    fitInto(body, () => body.scrollHeight <= box.clientHeight + 1 &&
      body.scrollWidth <= box.clientWidth + 1, Math.max(24, window.innerHeight * 0.16), 14);
  }

  function setEmergency(em) {
    state.emergency = em;
    if (em) {
      el.emergencyBody.textContent = typeof em.text === "string" && em.text ? em.text
        : TEXT.emergency;
      el.emergency.hidden = false;
      fitEmergency();
    } else {
      el.emergency.hidden = true;
      el.emergencyBody.textContent = "";
    }
  }

  // ---- commands ----------------------------------------------------------------------------
  function execute(command, args) {
    switch (command) {
      case "display":
        setContent(args.clear && !args.items && !args.text && !args.image && !args.video &&
          !args.ticker ? null : normalize(args, now()));
        return;
      case "emergency":
        if (typeof args.on !== "boolean") throw new Error("args.on phải là true/false / must be a boolean");
        setEmergency(args.on ? {...args} : null);
        return;
      case "power":
        if (typeof args.on !== "boolean") throw new Error("args.on phải là true/false / must be a boolean");
        state.power = args.on;
        el.blank.hidden = args.on;
        return;
      case "reboot":
        setTimeout(() => location.reload(), Math.max(0, Number(args.delay_s) || 0) * 1000 + 200);
        return;
      case "play":
      case "stop":
      case "volume":
        throw new Error(TEXT.noAudio);
      default:
        throw new Error(`lệnh không hỗ trợ / unsupported command ${command}`);
    }
  }

  function onCommand(msg) {
    const id = typeof msg.id === "string" ? msg.id : "";
    if (!id) return;
    const known = state.seen.get(id);
    if (known) { send(known); return; } // a re-sent command: executed once, acked again
    let ack;
    if (typeof msg.expires === "number" && msg.expires < now()) {
      ack = {type: "ack", id, ok: false, error: "expired"};
    } else {
      try {
        execute(msg.command, msg.args && typeof msg.args === "object" ? msg.args : {});
        ack = {type: "ack", id, ok: true};
      } catch (e) {
        ack = {type: "ack", id, ok: false, error: String(e && e.message || e).slice(0, 500)};
      }
    }
    state.seen.set(id, ack);
    if (state.seen.size > MAX_SEEN) state.seen.delete(state.seen.keys().next().value);
    send(ack);
  }

  function applyConfig(cfg) {
    if (!cfg || typeof cfg !== "object") return;
    state.name = typeof cfg.name === "string" ? cfg.name : "";
    document.title = state.name ? `${state.name} - Bảng tin / Board` : document.title;
    setContent(cfg.display ? normalize(cfg.display, now()) : null);
    setEmergency(cfg.emergency && cfg.emergency.on ? cfg.emergency : null);
  }

  // ---- the control channel -------------------------------------------------------------------
  function send(msg) {
    const ws = state.ws;
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({v: PROTOCOL, ...msg}));
  }

  function screenSize() {
    const clamp = (n) => Math.min(16384, Math.max(1, Math.round(n)));
    return {width: clamp(window.innerWidth), height: clamp(window.innerHeight)};
  }

  function heartbeat() {
    let playing = false;
    const shown = [];
    for (const region of Object.values(state.regions)) {
      const box = region.boxes.get(region.current);
      if (!box || el.board.hidden) continue;
      shown.push(box.dataset.id);
      reportShown(region, now());
      const v = box.querySelector("video");
      if (v && !v.paused) playing = true;
    }
    const failed = state.content && state.content.items.some(
      (it) => state.failed.has(signature(it)) && isValid(it, now()));
    send({type: "heartbeat", state: !state.power ? "off" : playing ? "playing" : "idle",
      firmware: FIRMWARE, faults: failed ? ["display_fault"] : [],
      display: {...screenSize(), items: shown.slice(0, 50),
        emergency: Boolean(state.emergency)}});
  }

  function scheduleHeartbeat() {
    clearTimeout(state.heartbeatTimer);
    const period = state.heartbeatS * 1000;
    const t = performance.now();
    // Absolute deadlines: a late timer does not shift the following ones.
    state.nextHeartbeat = Math.max(state.nextHeartbeat + period, t);
    state.heartbeatTimer = setTimeout(() => {
      heartbeat();
      scheduleHeartbeat();
    }, state.nextHeartbeat - t);
  }

  function status(text) {
    el.status.textContent = text || "";
    el.status.hidden = !text;
  }

  function connect() {
    clearTimeout(state.reconnectTimer);
    if (state.stopped) return;
    status(TEXT.connecting);
    const url = new URL("api/v1/devices/connect", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    url.search = "";
    let ws;
    try {
      ws = new WebSocket(url.href);
    } catch (e) {
      reconnectLater();
      return;
    }
    state.ws = ws;
    ws.onopen = () => {
      send({type: "hello", device: state.device, key: state.key, firmware: FIRMWARE,
        capabilities: {codecs: ["opus", "mp3"], transports: ["http"], display: screenSize()}});
    };
    ws.onmessage = (ev) => {
      if (ws !== state.ws) return;
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch (_) {
        console.warn("loa board: malformed message");
        return;
      }
      if (!msg || typeof msg !== "object") return;
      if (msg.type === "welcome") {
        if (typeof msg.server_time === "number") {
          state.clockOffset = msg.server_time - Date.now() / 1000;
        }
        if (typeof msg.heartbeat === "number" && msg.heartbeat > 0) state.heartbeatS = msg.heartbeat;
        state.backoff = 1;
        status("");
        applyConfig(msg.config);
        heartbeat();
        state.nextHeartbeat = performance.now();
        scheduleHeartbeat();
      } else if (msg.type === "config") {
        applyConfig(msg.config);
      } else if (msg.type === "command") {
        onCommand(msg);
      } else if (msg.type === "error") {
        console.warn("loa board: server error:", msg.error);
      }
    };
    ws.onclose = (ev) => {
      if (ws !== state.ws) return;
      state.ws = null;
      clearTimeout(state.heartbeatTimer);
      closed(ev.code);
    };
  }

  function closed(code) {
    if (code === 4001 || code === 4003) {
      state.stopped = true;
      store.del(LS.key);
      state.key = "";
      gate(TEXT[code]);
    } else if (code === 4009) {
      state.stopped = true;
      gate(TEXT[4009]);
    } else {
      reconnectLater();
    }
  }

  function reconnectLater() {
    if (state.stopped) return;
    const base = state.backoff;
    state.backoff = Math.min(BACKOFF_MAX_S, state.backoff * 2);
    const delay = base * (0.8 + 0.4 * Math.random()); // ±20 %: boards never reconnect in step
    status(TEXT.retry(Math.ceil(delay)));
    state.reconnectTimer = setTimeout(connect, delay * 1000);
  }

  // ---- login -----------------------------------------------------------------------------------
  function gate(message) {
    el.gateMessage.textContent = message;
    el.loginDevice.value = state.device;
    el.loginKey.value = "";
    el.gate.hidden = false;
    status("");
  }

  function start(device, key) {
    state.device = device;
    state.key = key;
    state.stopped = false;
    state.backoff = 1;
    el.gate.hidden = true;
    connect();
  }

  function onLogin(ev) {
    ev.preventDefault();
    const device = el.loginDevice.value.trim();
    const key = el.loginKey.value.trim();
    if (!device || !key) return;
    if (device !== store.get(LS.device)) store.del(LS.content);
    store.set(LS.device, device);
    store.set(LS.key, key);
    history.replaceState(null, "", `${location.pathname}?device=${encodeURIComponent(device)}`);
    start(device, key);
  }

  function restoreContent(device) {
    const raw = store.get(LS.content);
    if (!raw) return;
    try {
      const saved = JSON.parse(raw);
      if (saved && saved.device === device && saved.content) setContent(saved.content, false);
    } catch (_) {
      store.del(LS.content);
    }
  }

  /** The page's elements and regions (the board and its preview). */
  function bind() {
    for (const id of ["board", "idle", "status", "emergency", "blank", "gate", "ticker"]) {
      el[id] = $(id);
    }
    el.tickerText = $("ticker-text");
    el.emergencyText = $("emergency-text");
    el.emergencyBody = document.createElement("div");
    el.emergencyBody.id = "emergency-body";
    el.emergencyText.appendChild(el.emergencyBody);
    el.idleClock = $("idle-clock");
    el.idleDate = $("idle-date");
    el.idleName = $("idle-name");
    el.gateMessage = $("gate-message");
    el.loginDevice = $("login-device");
    el.loginKey = $("login-key");
    state.regions = {
      main: {name: "main", el: $("region-main"), boxes: new Map(), current: null, since: 0},
      side: {name: "side", el: $("region-side"), boxes: new Map(), current: null, since: 0},
    };
    window.addEventListener("resize", refit);
  }

  /** Validity is evaluated every second, on the second. */
  function tick() {
    render();
    setTimeout(tick, 1000 - (Date.now() % 1000) + 5);
  }

  function init() {
    bind();
    $("login").addEventListener("submit", onLogin);

    const params = new URLSearchParams(location.search);
    const storedDevice = store.get(LS.device) || "";
    let device = params.get("device") || storedDevice;
    let key = params.get("key") || "";
    if (key) {
      if (device !== storedDevice) store.del(LS.content);
      store.set(LS.device, device);
      store.set(LS.key, key);
    } else if (device === storedDevice) {
      key = store.get(LS.key) || "";
    }
    if (params.has("key")) { // never leave the key in the address bar, history or screenshots
      history.replaceState(null, "", device
        ? `${location.pathname}?device=${encodeURIComponent(device)}` : location.pathname);
    }
    device = device.trim();
    key = key.trim();
    state.device = device;
    if (device) restoreContent(device);
    tick();
    if (device && key) start(device, key);
    else gate(TEXT.login);
  }

  /** Preview mode (`/board?preview`, framed by the operator console): this renderer with no
   *  connection, login or storage; the console calls loaBoard.preview(args) with a display
   *  command's args, so what it shows is what a board shows for them. */
  function previewMode() {
    bind();
    el.status.hidden = true;
    tick();
    window.loaBoard.preview = (args) => {
      state.content = normalize(args, now());
      state.failed.clear();
      render();
    };
  }

  // For operators' consoles and tests: the schedule rules of this page.
  window.loaBoard = {isValid, normalize, state};
  const preview = new URLSearchParams(location.search).has("preview");
  const begin = preview ? previewMode : init;

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", begin);
  else begin();
})();
