// Devices: the caller's loudspeakers and boards, filtered and paged by the server (a province has
// 10,000), with their telemetry; commands to one device or to the whole filtered set, with their
// acknowledgements from the live `command` events; a map of what has coordinates. `device`
// events change a row's status in place (rows do not jump away while being read).
import { signal } from "@preact/signals";
import { useEffect, useState } from "preact/hooks";
import { html, t, half, word } from "./i18n.js";
import { api, session, ApiFailure } from "./api.js";
import { on } from "./live.js";
import { dateTime } from "./format.js";
import { useSubmit } from "./forms.js";
import { DeviceMap } from "./map.js";

const PAGE = 50;
const filters = signal({ status: "", kind: "" });
const trail = signal([]); // [{code, name}] from the caller's area down to the filtered one
const below = signal([]); // areas just below the filtered one (the area filter offers them)
const list = signal(null); // {total, devices} of the page shown
const offset = signal(0);
const view = signal("list"); // or "map"
const failure = signal("");
const acks = new Map(); // command id or batch -> its last `command` event (it may beat the POST)
const ackTick = signal(0);

function refused(e) { return e instanceof ApiFailure ? half(e.message) : t("console.network"); }
// The trail, starting at the caller's area (a new login starts there again).
function path() {
  const me = session.value.area;
  return trail.value[0]?.code === me.code ? trail.value : [{ code: me.code, name: me.name }];
}
const here = () => path()[path().length - 1].code;

async function reload() {
  const f = filters.value;
  const q = new URLSearchParams({ area: here(), limit: PAGE, offset: offset.value });
  if (f.status) q.set("status", f.status);
  if (f.kind) q.set("kind", f.kind);
  try {
    const [found, areas] = await Promise.all([
      api("GET", `/api/v1/devices?${q}`),
      api("GET", `/api/v1/areas?parent=${encodeURIComponent(here())}`)]);
    list.value = found;
    below.value = areas.areas;
    failure.value = "";
  } catch (e) { failure.value = refused(e); list.value = null; }
}

function goTo(area) { // an area of the trail (up) or just below (down)
  const at = path().findIndex((a) => a.code === area.code);
  trail.value = at >= 0 ? path().slice(0, at + 1) : [...path(), area];
  offset.value = 0;
  reload();
}

function statusChanged(ev) {
  const l = list.value;
  if (!l || !l.devices.some((d) => d.id === ev.id)) return;
  list.value = { ...l, devices: l.devices.map((d) => (d.id === ev.id
    ? { ...d, status: ev.status, last_seen: ev.at ?? d.last_seen } : d)) };
}

export function acked(ev) {
  acks.set(ev.command_batch || ev.id, ev);
  if (acks.size > 200) acks.delete(acks.keys().next().value);
  ackTick.value++;
}

// The telemetry an operator reads at a glance (docs/device-protocol.md, heartbeat).
function telemetry(d) {
  const tm = d.telemetry || {};
  const loss = tm.stream?.loss;
  return [
    ["last_seen", dateTime(d.last_seen || tm.at) || "—"],
    ["signal", tm.network?.signal_dbm !== undefined
      ? `${tm.network.signal_dbm} dBm${tm.network.type ? ` (${tm.network.type})` : ""}` : "—"],
    ["volume", String(tm.volume ?? d.volume)],
    ["firmware", d.firmware || "—"],
    ["stream", tm.state ? stateWord(tm.state) : "—"],
    ["loss", loss !== undefined ? `${(loss * 100).toFixed(1)} %` : "—"],
  ];
}

function stateWord(s) {
  return { playing: t("console.devices.state.playing"), idle: t("console.devices.state.idle"),
           off: t("console.devices.state.off") }[s] ?? s;
}

function commandWord(c) {
  return { volume: t("console.devices.cmd.volume"), power: t("console.devices.cmd.power"),
           play: t("console.devices.cmd.play"), stop: t("console.devices.cmd.stop"),
           reboot: t("console.devices.cmd.reboot"), display: t("console.devices.cmd.display"),
           emergency: t("console.devices.cmd.emergency") }[c] ?? c;
}

function outcomeWord(s) {
  return { queued: t("console.devices.cmd_status.queued"), sent: t("console.devices.cmd_status.sent"),
           acked: t("console.devices.cmd_status.acked"), failed: t("console.devices.cmd_status.failed"),
           expired: t("console.devices.cmd_status.expired") }[s] ?? s;
}

function Facts({ d }) {
  const names = { last_seen: t("console.devices.last_seen"), signal: t("console.devices.signal"),
                  volume: t("console.devices.volume"), firmware: t("console.devices.firmware"),
                  stream: t("console.devices.stream"), loss: t("console.devices.loss") };
  return html`<dl class="telemetry">${telemetry(d).map(([k, v]) => html`
    <div class=${k}><dt>${names[k]}</dt><dd>${v}</dd></div>`)}</dl>`;
}

function Status({ status }) {
  return html`<span class="status ${status}">${word("status", status)}</span>`;
}

// ---- commands -----------------------------------------------------------------------------
function body(f) {
  const c = f.get("command");
  if (c === "volume") return { command: c, args: { volume: Number(f.get("volume")) } };
  if (c === "power_on" || c === "power_off") return { command: "power", args: { on: c === "power_on" } };
  return { command: c, args: {} };
}

export function Outcome({ sent }) {
  ackTick.value; // re-read when an acknowledgement arrives
  if (!sent) return null;
  const ev = acks.get(sent.key);
  if (sent.batch) {
    const n = ev ? ev.acked : 0;
    return html`<p class="outcome" role="status">${t("console.devices.acked_of", { n, m: sent.devices })}
      ${ev && ev.failed > 0 ? ` · ${t("console.devices.failed_n", { n: ev.failed })}` : ""}</p>`;
  }
  const text = !ev ? (sent.online ? t("console.devices.waiting_ack") : t("console.devices.queued"))
    : ev.status === "acked" ? t("console.devices.ack_ok")
      : t("console.devices.ack_failed", { error: ev.error ? half(ev.error) : ev.status });
  return html`<p class="outcome" role="status">${text}</p>`;
}

function CommandForm({ id, legend, send }) {
  const [command, setCommand] = useState("volume");
  const [sent, setSent] = useState(null);
  const form = useSubmit(async (f) => setSent(await send(body(f))));
  const mayAir = session.value.rights.includes("air");
  return html`<form class="command" onSubmit=${form.submit} aria-labelledby=${`${id}-legend`}>
    <h2 id=${`${id}-legend`}>${legend}</h2>
    ${!mayAir && html`<p class="reason">${t("console.devices.no_air")}</p>`}
    <label for=${`${id}-command`}>${t("console.devices.command")}</label>
    <select id=${`${id}-command`} name="command" disabled=${!mayAir}
            onChange=${(e) => setCommand(e.target.value)}>
      <option value="volume">${t("console.devices.cmd.volume")}</option>
      <option value="power_on">${t("console.devices.cmd.power_on")}</option>
      <option value="power_off">${t("console.devices.cmd.power_off")}</option>
      <option value="play">${t("console.devices.cmd.play")}</option>
      <option value="stop">${t("console.devices.cmd.stop")}</option>
      <option value="reboot">${t("console.devices.cmd.reboot")}</option>
    </select>
    ${command === "volume" && html`<label for=${`${id}-volume`}>${t("console.devices.volume")}</label>
      <input id=${`${id}-volume`} name="volume" type="number" min="0" max="100" value="70"
             required disabled=${!mayAir} />`}
    <button type="submit" disabled=${!mayAir || form.busy}>${t("console.devices.send")}</button>
    ${form.failure && html`<p class="error" role="alert">${form.failure.message}</p>`}
    <${Outcome} sent=${form.failure ? null : sent} />
  </form>`;
}

export async function sendOne(id, b) {
  const r = await api("POST", `/api/v1/devices/${encodeURIComponent(id)}/commands`, b);
  return { key: r.id, online: r.online };
}

async function sendBulk(b) {
  const f = filters.value;
  const r = await api("POST", "/api/v1/devices/commands", {
    ...b, area: here(), ...(f.kind && { kind: f.kind }), ...(f.status && { status: f.status }) });
  return { key: r.command_batch, batch: true, devices: r.devices };
}

// ---- the list -----------------------------------------------------------------------------
function Filters() {
  const f = filters.value;
  const set = (k) => (e) => { filters.value = { ...f, [k]: e.target.value }; offset.value = 0; reload(); };
  const pick = (e) => {
    const code = e.target.value;
    goTo(path().find((a) => a.code === code) || below.value.find((a) => a.code === code)
         || { code, name: code });
  };
  return html`<form class="filters" onSubmit=${(e) => e.preventDefault()}>
    <div><label for="filter-area">${t("console.devices.area")}</label>
      <select id="filter-area" value=${here()} onChange=${pick}>
        ${path().map((a, i) => html`<option value=${a.code}>${"‹ ".repeat(i)}${a.name}</option>`)}
        ${below.value.map((a) => html`<option value=${a.code}>› ${a.name}</option>`)}
      </select></div>
    <div><label for="filter-status">${t("console.devices.status")}</label>
      <select id="filter-status" value=${f.status} onChange=${set("status")}>
        <option value="">${t("console.devices.all")}</option>
        <option value="online">${word("status", "online")}</option>
        <option value="offline">${word("status", "offline")}</option>
        <option value="fault">${word("status", "fault")}</option>
      </select></div>
    <div><label for="filter-kind">${t("console.devices.kind")}</label>
      <select id="filter-kind" value=${f.kind} onChange=${set("kind")}>
        <option value="">${t("console.devices.all")}</option>
        <option value="loudspeaker">${t("console.devices.kind.loudspeaker")}</option>
        <option value="board">${t("console.devices.kind.board")}</option>
      </select></div>
  </form>`;
}

function Pager({ total }) {
  const from = offset.value;
  const move = (by) => { offset.value = from + by; reload(); };
  return html`<nav class="pager" aria-label=${t("console.devices.pages")}>
    <button type="button" disabled=${from === 0} onClick=${() => move(-PAGE)}>${t("console.devices.previous")}</button>
    <span>${t("console.devices.range", { from: total ? from + 1 : 0, to: Math.min(from + PAGE, total), total })}</span>
    <button type="button" disabled=${from + PAGE >= total} onClick=${() => move(PAGE)}>${t("console.devices.next")}</button>
  </nav>`;
}

function Row({ d }) {
  return html`<li class="device" data-id=${d.id} data-status=${d.status}>
    <div class="head"><a href=${`#/devices/${encodeURIComponent(d.id)}`}>${d.name}</a>
      <${Status} status=${d.status} />
      <span class="where">${d.kind === "board" ? t("console.devices.kind.board")
                                                : t("console.devices.kind.loudspeaker")} · ${d.area}</span></div>
    <${Facts} d=${d} /></li>`;
}

function DeviceList() {
  const l = list.value;
  const pressed = (v) => (view.value === v ? "true" : "false");
  return html`<h1>${t("console.devices")}</h1>
    <${Filters} />
    ${failure.value && html`<p class="error" role="alert">${failure.value}</p>`}
    <div class="views" role="group" aria-label=${t("console.devices.view")}>
      <button type="button" aria-pressed=${pressed("list")} onClick=${() => { view.value = "list"; }}>${t("console.devices.as_list")}</button>
      <button type="button" aria-pressed=${pressed("map")} onClick=${() => { view.value = "map"; }}>${t("console.devices.as_map")}</button>
    </div>
    ${!l ? (!failure.value && html`<p class="loading">${t("console.loading")}</p>`)
      : view.value === "map"
        ? html`<${DeviceMap} area=${here()} status=${filters.value.status} kind=${filters.value.kind}
            version=${l} onArea=${goTo} />`
        : html`<${Pager} total=${l.total} />
          ${l.devices.length ? html`<ul class="device-list">${l.devices.map((d) => html`<${Row} key=${d.id} d=${d} />`)}</ul>`
                             : html`<p>${t("console.devices.none")}</p>`}`}
    ${l && l.total > 0 && html`<${CommandForm} id="bulk" send=${sendBulk}
        legend=${t("console.devices.bulk", { n: l.total })} />`}`;
}

export function Devices() {
  useEffect(() => {
    reload();
    const offs = [on("device", statusChanged), on("command", acked), on("resync", reload)];
    return () => offs.forEach((off) => off());
  }, []);
  return html`<${DeviceList} />`;
}

// ---- one device ---------------------------------------------------------------------------
export function Device({ id }) {
  const [d, setD] = useState(null);
  const [history, setHistory] = useState([]);
  const [problem, setProblem] = useState("");
  const path = `/api/v1/devices/${encodeURIComponent(id)}`;
  const load = async () => {
    try {
      const [rec, cmds] = await Promise.all([api("GET", path), api("GET", `${path}/commands`)]);
      setD(rec); setHistory(cmds.commands.slice(0, 20)); setProblem("");
    } catch (e) { setProblem(refused(e)); }
  };
  useEffect(() => {
    load();
    const offs = [on("device", (ev) => { if (ev.id === id) load(); }),
                  on("command", (ev) => { acked(ev); if (ev.device === id) load(); }),
                  on("resync", load)];
    return () => offs.forEach((off) => off());
  }, [id]);
  const back = html`<p><a href="#/devices">${t("console.devices.back")}</a></p>`;
  if (!d) return html`${back}<h1>${t("console.devices.device")}</h1>
    ${problem ? html`<p class="error" role="alert">${problem}</p>` : html`<p class="loading">${t("console.loading")}</p>`}`;
  const tm = d.telemetry || {};
  return html`${back}<h1>${d.name}</h1>
    <p><${Status} status=${d.status} />${` · ${d.connected ? t("console.devices.connected")
                                                          : t("console.devices.not_connected")} · ${d.area}`}</p>
    ${problem && html`<p class="error" role="alert">${problem}</p>`}
    <${Facts} d=${d} />
    <dl class="facts">
      ${tm.gps && html`<dt>${t("console.devices.gps")}</dt><dd>${tm.gps.join(", ")}</dd>`}
      <dt>${t("console.devices.faults")}</dt><dd>${(d.faults || []).join(", ") || "—"}</dd>
      <dt>${t("console.devices.queued_n")}</dt><dd>${d.queued_commands}</dd>
    </dl>
    <${CommandForm} id="one" legend=${t("console.devices.commands")} send=${(b) => sendOne(id, b)} />
    <h2>${t("console.devices.history")}</h2>
    ${history.length ? html`<ol class="history">${history.map((c) => html`<li key=${c.id} data-status=${c.status}>
        <time>${dateTime(c.created)}</time> ${commandWord(c.command)} · ${outcomeWord(c.status)}${c.error ? ` · ${half(c.error)}` : ""}</li>`)}</ol>`
      : html`<p>${t("console.devices.no_history")}</p>`}`;
}
