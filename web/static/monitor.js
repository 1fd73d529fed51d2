// Loa monitor page: log in, poll GET /api/v1/monitor, listen to an area over WHEP.
// Plain JS, no dependency. Every text from the server goes into the DOM as text, never as HTML.
"use strict";

(function () {
  const TOKEN_KEY = "loa.monitor.token";
  const USER_KEY = "loa.monitor.user";
  const REFRESH_MS = 1500;
  const STATS_MS = 1000;
  const ICE_WAIT_MS = 3000;

  const CLASS_LABEL = {
    emergency: "Khẩn cấp / Emergency",
    priority: "Ưu tiên / Priority",
    normal: "Thông thường / Normal",
    background: "Nền / Background",
  };
  const CAUSE_LABEL = {
    start: "bắt đầu / started",
    preempt: "giành quyền phát / preempted",
    ended: "hết giờ / ended",
    finished: "phát xong / finished",
    stopped: "bị dừng / stopped",
    skipped: "bỏ qua / skipped",
    "source-error": "lỗi nguồn / source error",
  };

  const $ = (id) => document.getElementById(id);
  const nf = new Intl.NumberFormat("vi-VN");
  const nf1 = new Intl.NumberFormat("vi-VN", { maximumFractionDigits: 1 });
  const state = { token: null, timer: null, rows: new Map(), listening: null, focus: null,
                  gen: 0 };

  // ---- helpers ------------------------------------------------------------------------------
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function fmtBytes(n) {
    if (n >= 1e6) return nf1.format(n / 1e6) + " MB";
    if (n >= 1e3) return nf1.format(n / 1e3) + " kB";
    return nf.format(n) + " B";
  }

  function fmtMs(v) {
    return v === null || v === undefined ? "—" : nf1.format(v) + " ms";
  }

  function fmtDuration(s) {
    s = Math.floor(s);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    return (h ? h + " giờ/h " : "") + (h || m ? m + " phút/min " : "") + sec + " giây/s";
  }

  function fmtClock(epoch) {
    return new Date(epoch * 1000).toLocaleTimeString("vi-VN", { hour12: false });
  }

  async function errorText(r) {
    try {
      const body = await r.json();
      if (body && body.error) return body.error;
    } catch (e) { /* not JSON */ }
    return "HTTP " + r.status;
  }

  function setStatus(text, bad) {
    const s = $("status");
    s.textContent = text;
    s.classList.toggle("bad", Boolean(bad));
  }

  // ---- login --------------------------------------------------------------------------------
  function showLogin(message) {
    stopRefresh();
    stopListening();
    state.token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    $("monitor-view").hidden = true;
    $("who").hidden = true;
    $("login-view").hidden = false;
    const err = $("login-error");
    err.hidden = !message;
    err.textContent = message || "";
  }

  function showMonitor() {
    $("login-view").hidden = true;
    $("monitor-view").hidden = false;
    $("who").hidden = false;
    $("who-name").textContent = sessionStorage.getItem(USER_KEY) || "";
    startRefresh();
  }

  async function login(ev) {
    ev.preventDefault();
    const button = $("login-button");
    button.disabled = true;
    try {
      const r = await fetch("/api/v1/auth/token", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ username: $("username").value, password: $("password").value }),
      });
      if (r.status !== 201) {
        showLogin(await errorText(r));
        return;
      }
      const body = await r.json();
      state.token = body.token;
      sessionStorage.setItem(TOKEN_KEY, body.token);
      const u = body.user || {};
      sessionStorage.setItem(USER_KEY, (u.username || "") + (u.area ? " · " + u.area : ""));
      $("password").value = "";
      showMonitor();
    } catch (e) {
      showLogin("Không kết nối được máy chủ / cannot reach the server");
    } finally {
      button.disabled = false;
    }
  }

  async function logout() {
    const token = state.token;
    showLogin("");
    if (token) {
      try {
        await fetch("/api/v1/auth/token", {
          method: "DELETE", headers: { Authorization: "Bearer " + token },
        });
      } catch (e) { /* already gone */ }
    }
  }

  // ---- refresh ------------------------------------------------------------------------------
  // One polling chain at a time: a new chain (login, another area) makes the old one stop.
  function startRefresh() {
    stopRefresh();
    refresh(state.gen);
  }

  function stopRefresh() {
    if (state.timer !== null) clearTimeout(state.timer);
    state.timer = null;
    state.gen += 1;
  }

  async function refresh(gen) {
    state.timer = null;
    if (!state.token || gen !== state.gen) return;
    try {
      // One level at a time: the area in focus and its children (a province has thousands of
      // areas); every row also carries the totals of its whole subtree.
      const focus = state.focus;
      const url = "/api/v1/monitor?depth=1" + (focus ? "&area=" + encodeURIComponent(focus) : "");
      const r = await fetch(url, {
        headers: { Authorization: "Bearer " + state.token }, cache: "no-store",
      });
      if (r.status === 401) {
        showLogin("Phiên đăng nhập đã hết hạn / session expired, please log in again");
        return;
      }
      if (gen !== state.gen) return; // superseded while the answer was on its way
      if ((r.status === 403 || r.status === 404) && focus) {
        setFocus(null); // the area went away or is outside the scope: back to the top
        return;
      }
      if (!r.ok) {
        setStatus("Lỗi / error: " + (await errorText(r)), true);
      } else {
        const data = await r.json();
        if (gen !== state.gen) return;
        render(data);
        setStatus("Cập nhật lúc / updated at " + fmtClock(Date.now() / 1000), false);
      }
    } catch (e) {
      setStatus("Mất kết nối, đang thử lại / connection lost, retrying", true);
    }
    if (state.token && gen === state.gen) state.timer = setTimeout(() => refresh(gen), REFRESH_MS);
  }

  function setFocus(code) {
    state.focus = code;
    const hash = code ? "#area=" + encodeURIComponent(code) : "";
    if (window.location.hash !== hash) history.replaceState(null, "", window.location.pathname + hash);
    for (const row of state.rows.values()) row.tr.remove();
    state.rows.clear();
    startRefresh();
  }

  function renderCrumbs(path) {
    const nav = $("crumbs");
    const parts = [];
    path.forEach((p, i) => {
      if (i) parts.push(el("span", "sep", "›"));
      if (i < path.length - 1) {
        const b = el("button", "crumb", p.name);
        b.type = "button";
        b.title = p.code;
        b.addEventListener("click", () => setFocus(i === 0 ? null : p.code));
        parts.push(b);
      } else {
        parts.push(el("span", "crumb current", p.name + " (" + p.code + ")"));
      }
    });
    nav.replaceChildren(...parts);
  }

  function render(data) {
    renderCrumbs(data.path || []);
    $("hint").hidden = !data.areas.some((a) => a.children > 0);
    const n = data.node;
    const degraded = $("store-degraded");
    degraded.hidden = n.store.writable;
    degraded.textContent = n.store.writable ? "" :
      "Kho dữ liệu không ghi được, chỉ phát nội dung đã lưu / store is read-only or full, " +
      "airing what is stored: " + (n.store.reason || "") +
      (n.store.queued ? " (" + nf.format(n.store.queued) + " chờ ghi / queued)" : "");
    $("node-lag").textContent = fmtMs(n.loop.loop_lag_ms) + " (max " + fmtMs(n.loop.loop_lag_max_ms) + ")";
    $("node-late").textContent = nf.format(n.clock.late_ticks) + " / " + nf.format(n.clock.ticks);
    $("node-lateness").textContent = fmtMs(n.clock.max_lateness_ms);
    $("node-skipped").textContent = nf.format(n.clock.skipped_ticks);
    $("node-mixes").textContent = nf.format(n.engine.mixes_consumed) + " / " +
      nf.format(n.engine.mixes) + " · " + nf.format(n.engine.encoders);
    $("node-devices").textContent = nf.format(n.devices.online) + " / " +
      nf.format(n.devices.offline) + (n.devices.fault ? " · lỗi/fault " + nf.format(n.devices.fault) : "");
    $("node-peers").textContent = nf.format(n.transports.webrtc.peers);
    $("node-uptime").textContent = fmtDuration(n.uptime_s);

    const tbody = document.querySelector("#areas tbody");
    const seen = new Set();
    for (const a of data.areas) {
      seen.add(a.code);
      let row = state.rows.get(a.code);
      if (!row) {
        row = makeRow(a);
        state.rows.set(a.code, row);
      }
      tbody.appendChild(row.tr); // keeps the server's order (parents before children)
      fillRow(row, a, a.code !== data.scope);
    }
    for (const [code, row] of state.rows) {
      if (!seen.has(code)) {
        row.tr.remove();
        state.rows.delete(code);
      }
    }
  }

  function makeRow(a) {
    const tr = el("tr");
    tr.dataset.area = a.code;
    const cells = {};
    for (const name of ["area", "onair", "why", "http", "rtp", "webrtc", "hls", "kbps",
                        "packets", "quality", "devices", "listen"]) {
      cells[name] = el("td", "c-" + name);
      tr.appendChild(cells[name]);
    }
    for (const name of ["http", "rtp", "webrtc", "kbps", "packets"]) cells[name].classList.add("num");
    const button = el("button", "listen", "Nghe / Listen");
    button.type = "button";
    button.addEventListener("click", () => {
      if (state.listening && state.listening.area === a.code) stopListening();
      else listen(a.code);
    });
    cells.listen.appendChild(button);
    return { tr, cells, button };
  }

  function fillRow(row, a, child) {
    const c = row.cells;
    const name = el("div", "name", a.name);
    const parts = [name, el("div", "code", a.code)];
    if (child && a.children > 0) {
      const open = el("button", "drill", "Mở " + a.children + " khu vực con ▸ / open");
      open.type = "button";
      open.addEventListener("click", () => setFocus(a.code));
      parts.push(open);
    }
    c.area.replaceChildren(...parts);
    c.area.style.paddingLeft = child ? "1.7em" : "0.5em";
    const on = a.on_air;
    row.tr.classList.toggle("on", Boolean(on));
    row.tr.dataset.class = on ? on.class : "";
    if (on) {
      const parts = [el("div", "title", on.title)];
      const since = el("div", "since", "từ / since " + fmtClock(on.since_epoch));
      parts.push(since);
      if (a.last_change && a.last_change.cause) {
        parts.push(el("div", "cause", "lý do / cause: " +
          (CAUSE_LABEL[a.last_change.cause] || a.last_change.cause)));
      }
      if (on.overlays && on.overlays.length) {
        parts.push(el("div", "cause", "chèn / overlays: " + on.overlays.length));
      }
      c.onair.replaceChildren(...parts);
      const auth = on.authority || {};
      const badge = el("span", "badge " + on.class, CLASS_LABEL[on.class] || on.class);
      const who = el("div", "authority", "cấp phát / authority: " + (auth.name || on.issuer) +
        " (" + on.issuer + ")" + (on.user ? " · " + on.user : ""));
      c.why.replaceChildren(badge, who);
    } else {
      c.onair.replaceChildren(el("span", "silent", "— im lặng / silent"));
      c.why.replaceChildren();
    }
    const L = a.listeners;
    const S = a.subtree.listeners;
    const sum = (cell, own, total) => {
      // own figure, and the subtree's when the area has children and they add something
      if (a.children > 0 && total !== own) cell.append(el("div", "sum", "Σ " + nf.format(total)));
    };
    c.http.textContent = L.http === null ? "—" : nf.format(L.http);
    sum(c.http, L.http || 0, S.http);
    c.http.title = a.http.map((h) => h.codec + ": " + h.listeners + " · bỏ/dropped " + h.dropped).join("\n");
    c.rtp.textContent = (L.rtp === null ? "—" : nf.format(L.rtp)) + (a.rtp_multicast ? " +mc" : "");
    c.rtp.title = a.rtp_multicast ? "đang phát multicast / multicast group is sent" : "";
    sum(c.rtp, L.rtp || 0, S.rtp);
    c.webrtc.textContent = nf.format(L.webrtc || 0);
    sum(c.webrtc, L.webrtc || 0, S.webrtc);
    c.hls.textContent = a.hls ? "chạy / on (" + a.hls.segments + ")" : "—";
    const kbps = a.channels.filter((ch) => ch.kbps !== null);
    c.kbps.textContent = kbps.length ? kbps.map((ch) => ch.codec + " " + nf1.format(ch.kbps)).join(" · ") : "—";
    c.packets.textContent = nf.format(a.packets);
    const q = a.quality;
    c.quality.textContent = q.peers ? "RTT " + fmtMs(q.rtt_ms_max) + " · mất/lost " +
      nf.format(q.packets_lost) + " · rung/jitter " + fmtMs(q.jitter_ms_max) : "—";
    const d = a.children > 0 ? a.subtree.devices : a.devices;
    c.devices.textContent = d.online + d.offline + d.fault ?
      (a.children > 0 ? "Σ " : "") + "trực tuyến/online " + d.online + " · ngoại tuyến/offline " +
      d.offline + (d.fault ? " · lỗi/fault " + d.fault : "") : "—";
    const active = state.listening && state.listening.area === a.code;
    row.button.textContent = active ? "Dừng / Stop" : "Nghe / Listen";
    row.button.classList.toggle("active", Boolean(active));
  }

  // ---- listening over WHEP ------------------------------------------------------------------
  function iceComplete(pc) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        if (pc.iceGatheringState === "complete") {
          pc.removeEventListener("icegatheringstatechange", done);
          resolve();
        }
      };
      pc.addEventListener("icegatheringstatechange", done);
      setTimeout(resolve, ICE_WAIT_MS); // use what was gathered so far
    });
  }

  function listenFigure(id, value, text) {
    const e = $(id);
    e.dataset.value = String(value);
    e.textContent = text;
  }

  async function listen(area) {
    await stopListening();
    const session = { area, pc: null, location: null, statsTimer: null, audio: null };
    state.listening = session;
    $("listen").hidden = false;
    $("listen-area").textContent = area;
    $("listen-state").textContent = "đang kết nối / connecting";
    listenFigure("listen-bytes", 0, "0 B");
    listenFigure("listen-packets", 0, "0");
    listenFigure("listen-lost", 0, "0");
    $("listen-jitter").textContent = "—";
    $("listen-codec").textContent = "—";
    $("listen-level").textContent = "—";
    $("listen-level").dataset.value = "";
    markButtons();
    const pc = new RTCPeerConnection({ iceServers: [] });
    session.pc = pc;
    const tr = pc.addTransceiver("audio", { direction: "recvonly" });
    if (tr.setCodecPreferences && window.RTCRtpReceiver && RTCRtpReceiver.getCapabilities) {
      const opus = RTCRtpReceiver.getCapabilities("audio").codecs
        .filter((c) => c.mimeType.toLowerCase() === "audio/opus");
      if (opus.length) tr.setCodecPreferences(opus);
    }
    pc.addEventListener("track", (ev) => {
      const player = $("player");
      const stream = ev.streams && ev.streams[0] ? ev.streams[0] : new MediaStream([ev.track]);
      player.srcObject = stream;
      player.play().catch(() => { /* autoplay refused: the controls still work */ });
      meter(session, stream);
    });
    pc.addEventListener("connectionstatechange", () => {
      if (state.listening !== session) return;
      const labels = { connected: "đang nghe / playing", connecting: "đang kết nối / connecting",
                       failed: "thất bại / failed", disconnected: "mất kết nối / disconnected",
                       closed: "đã đóng / closed" };
      $("listen-state").textContent = labels[pc.connectionState] || pc.connectionState;
    });
    try {
      await pc.setLocalDescription(await pc.createOffer());
      await iceComplete(pc);
      if (state.listening !== session) return;
      const r = await fetch("/whep/" + encodeURIComponent(area), {
        method: "POST",  // the user's token: also valid where listening needs a listen token
        headers: { "Content-Type": "application/sdp", Authorization: "Bearer " + state.token },
        body: pc.localDescription.sdp,
      });
      if (r.status !== 201) throw new Error(await errorText(r));
      const loc = r.headers.get("Location");
      session.location = loc ? new URL(loc, window.location.href).href : null;
      const answer = await r.text();
      if (state.listening !== session) {
        dropSession(session);
        return;
      }
      await pc.setRemoteDescription({ type: "answer", sdp: answer });
      session.statsTimer = setInterval(() => readStats(session), STATS_MS);
    } catch (e) {
      if (state.listening === session) {
        $("listen-state").textContent = "lỗi / error: " + (e && e.message ? e.message : e);
        dropSession(session);
        state.listening = null;
        markButtons();
      }
    }
  }

  // Level meter: RMS of what arrives, in dBFS (Web Audio analyser on the received stream).
  function meter(session, stream) {
    const Ctx = window.AudioContext || window.webkitAudioContext;
    if (!Ctx) return;
    try {
      const ctx = new Ctx();
      const analyser = ctx.createAnalyser();
      analyser.fftSize = 4096;
      ctx.createMediaStreamSource(stream).connect(analyser);
      session.audio = { ctx, analyser };
      ctx.resume().catch(() => {});
    } catch (e) { /* no Web Audio: no meter */ }
  }

  function readLevel(session) {
    if (!session.audio) return null;
    const buf = new Float32Array(session.audio.analyser.fftSize);
    session.audio.analyser.getFloatTimeDomainData(buf);
    let sum = 0;
    for (const v of buf) sum += v * v;
    const rms = Math.sqrt(sum / buf.length);
    return rms > 0 ? 20 * Math.log10(rms) : -Infinity;
  }

  async function readStats(session) {
    if (state.listening !== session || !session.pc) return;
    let report;
    try {
      report = await session.pc.getStats();
    } catch (e) {
      return;
    }
    let codecId = null;
    report.forEach((s) => {
      if (s.type === "inbound-rtp" && (s.kind === "audio" || s.mediaType === "audio")) {
        listenFigure("listen-bytes", s.bytesReceived || 0, fmtBytes(s.bytesReceived || 0));
        listenFigure("listen-packets", s.packetsReceived || 0, nf.format(s.packetsReceived || 0));
        listenFigure("listen-lost", s.packetsLost || 0, nf.format(s.packetsLost || 0));
        $("listen-jitter").textContent = s.jitter === undefined ? "—" : fmtMs(s.jitter * 1000);
        codecId = s.codecId || null;
      }
    });
    const level = readLevel(session);
    if (level !== null) {
      $("listen-level").dataset.value = String(level);
      $("listen-level").textContent = isFinite(level) ? nf1.format(level) + " dBFS" : "im lặng / silent";
    }
    if (codecId && report.get(codecId)) {
      const c = report.get(codecId);
      $("listen-codec").textContent = c.mimeType + " " + (c.clockRate || "") + " Hz";
    }
  }

  function dropSession(session) {
    if (session.statsTimer !== null) clearInterval(session.statsTimer);
    session.statsTimer = null;
    if (session.pc) {
      try { session.pc.close(); } catch (e) { /* closed */ }
    }
    if (session.audio) {
      session.audio.ctx.close().catch(() => {});
      session.audio = null;
    }
    if (session.location) {
      // keepalive: the DELETE still goes out when the page is closing
      fetch(session.location, { method: "DELETE", keepalive: true }).catch(() => {});
      session.location = null;
    }
  }

  async function stopListening() {
    const session = state.listening;
    state.listening = null;
    if (session) dropSession(session);
    const player = $("player");
    if (player) {
      player.pause();
      player.srcObject = null;
    }
    if ($("listen")) $("listen").hidden = true;
    markButtons();
  }

  function markButtons() {
    for (const [code, row] of state.rows) {
      const active = Boolean(state.listening && state.listening.area === code);
      row.button.textContent = active ? "Dừng / Stop" : "Nghe / Listen";
      row.button.classList.toggle("active", active);
    }
  }

  // ---- start --------------------------------------------------------------------------------
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  $("listen-stop").addEventListener("click", () => stopListening());
  window.addEventListener("pagehide", () => {
    if (state.listening) dropSession(state.listening);
  });
  const m = /^#area=(.+)$/.exec(window.location.hash);
  state.focus = m ? decodeURIComponent(m[1]) : null;
  state.token = sessionStorage.getItem(TOKEN_KEY);
  if (state.token) showMonitor();
  else showLogin("");

  // For tests and the console: the live figures of the area being listened to.
  window.loaMonitor = {
    listening: () => (state.listening ? state.listening.area : null),
    bytesReceived: () => Number($("listen-bytes").dataset.value || 0),
    // The strongest frequency (Hz) of what is playing now, from the meter's analyser.
    peakHz: () => {
      const s = state.listening;
      if (!s || !s.audio) return null;
      const a = s.audio.analyser;
      const bins = new Float32Array(a.frequencyBinCount);
      a.getFloatFrequencyData(bins);
      let best = 1;
      for (let i = 2; i < bins.length; i++) if (bins[i] > bins[best]) best = i;
      return best * s.audio.ctx.sampleRate / a.fftSize;
    },
  };
})();
