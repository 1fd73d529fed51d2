// Overview: the caller's subtree one level at a time (a 5,000-area province loads only what is
// opened), what is on air in each area and why, device counts, the emergency banner, today's
// schedule and recent faults. Live through the one event stream: on-air changes update their row
// in place; device changes and resyncs reload the levels that are open.
import { signal } from "@preact/signals";
import { useEffect } from "preact/hooks";
import { html, t, half, word } from "./i18n.js";
import { api, ApiFailure } from "./api.js";
import { on } from "./live.js";
import { dateTime } from "./format.js";

const rows = new Map(); // area code -> signal(row from /api/v1/overview)
const levels = new Map(); // area code -> signal([child codes]) for every level loaded
const opened = signal(new Set());
const head = signal(null); // {root, emergencies, today, faults} of the caller's root
const failure = signal("");

function keep(row) {
  const s = rows.get(row.code);
  if (s) s.value = row; else rows.set(row.code, signal(row));
}

function level(code) {
  if (!levels.has(code)) levels.set(code, signal(null)); // null: not loaded yet
  return levels.get(code);
}

async function load(code) {
  level(code);
  const data = await api("GET", `/api/v1/overview?root=${encodeURIComponent(code)}`);
  keep(data.root);
  data.children.forEach(keep);
  levels.get(code).value = data.children.map((c) => c.code);
  return data;
}

function refused(e) {
  failure.value = e instanceof ApiFailure ? half(e.message) : t("console.network");
}

async function reload(root) {
  try {
    head.value = await load(root);
    await Promise.all([...opened.value].map(load));
    failure.value = "";
  } catch (e) { refused(e); }
}

function onAir(ev) {
  const s = rows.get(ev.area);
  if (!s) return;
  s.value = { ...s.value, on_air: ev.broadcast ? ev : null };
}

function emergency(ev) {
  if (!head.value) return;
  const others = head.value.emergencies.filter((e) => e.id !== ev.id);
  head.value = { ...head.value, emergencies: ev.state === "start" ? [...others, ev] : others };
}

function later(fn, ms) {
  let timer = null;
  return () => { clearTimeout(timer); timer = setTimeout(fn, ms); };
}

function toggle(code) {
  const next = new Set(opened.value);
  if (next.has(code)) next.delete(code); else { next.add(code); load(code).catch(refused); }
  opened.value = next;
}

function OnAir({ now }) {
  if (!now) return html`<span class="on-air idle" data-broadcast="">${t("console.not_on_air")}</span>`;
  return html`<span class="on-air ${`class-${now.class}`}" data-broadcast=${now.broadcast}>
    <strong>${now.title || now.broadcast}</strong>
    <span class="why">${word("class", now.class)}${now.issuer ? ` · ${now.issuer}` : ""}</span>
  </span>`;
}

function Devices({ d }) {
  if (!d.total) return html`<span class="devices">${t("console.no_devices")}</span>`;
  return html`<span class="devices">
    <span class="online">${t("console.devices_online", { n: d.online })}</span>
    ${d.offline > 0 && html` · <span class="offline">${t("console.devices_offline", { n: d.offline })}</span>`}
    ${d.fault > 0 && html` · <span class="fault">${t("console.devices_fault", { n: d.fault })}</span>`}
    <span class="total"> / ${d.total}</span></span>`;
}

function Row({ code }) {
  const row = rows.get(code).value;
  const isOpen = opened.value.has(code);
  const id = `level-${code}`;
  return html`<li class="area-row" data-code=${code}>
    <div class="row">
      ${row.children > 0
        ? html`<button type="button" class="name" aria-expanded=${isOpen ? "true" : "false"}
                 aria-controls=${id} onClick=${() => toggle(code)}>${row.name}</button>`
        : html`<span class="name">${row.name}</span>`}
      <${OnAir} now=${row.on_air} /><${Devices} d=${row.devices} />
    </div>
    ${isOpen && html`<${Level} code=${code} id=${id} />`}</li>`;
}

function Level({ code, id }) {
  const codes = level(code).value;
  if (!codes) return html`<p id=${id} class="loading">${t("console.loading")}</p>`;
  return html`<ul class="tree" id=${id}>${codes.map((c) => html`<${Row} key=${c} code=${c} />`)}</ul>`;
}

function Banner({ emergencies }) {
  if (!emergencies.length) return null;
  return html`<section class="emergency" role="alert">
    <h2>${t("console.emergency_active", { n: emergencies.length })}</h2>
    <ul>${emergencies.map((e) => html`<li key=${e.id}><strong>${e.title || e.id}</strong>
      ${e.issuer ? ` · ${e.issuer}` : ""} · ${t("console.areas_n", { n: e.areas.length })}</li>`)}</ul>
  </section>`;
}

export function Overview({ root }) {
  useEffect(() => {
    if (head.value?.root.code !== root) { head.value = null; opened.value = new Set(); }
    reload(root);
    const soon = later(() => reload(root), 1000);
    const offs = [on("onair", onAir), on("emergency", emergency), on("device", soon),
                  on("schedule", soon), on("resync", () => reload(root))];
    return () => offs.forEach((off) => off());
  }, [root]);
  const h = head.value?.root.code === root ? head.value : null; // not another area's
  if (!h) return html`<h1>${t("console.overview")}</h1>
    ${failure.value ? html`<p class="error" role="alert">${failure.value}</p>`
                    : html`<p class="loading">${t("console.loading")}</p>`}`;
  const me = rows.get(root).value;
  return html`<${Banner} emergencies=${h.emergencies} />
    <h1>${t("console.overview")}: <span class="area">${me.name}</span></h1>
    ${failure.value && html`<p class="error" role="alert">${failure.value}</p>`}
    <section class="root-row" data-code=${root} aria-label=${t("console.here")}>
      <${OnAir} now=${me.on_air} /> <${Devices} d=${me.devices} /></section>
    <h2>${t("console.areas")}</h2>
    ${levels.get(root).value.length ? html`<${Level} code=${root} id="level-root" />`
                                    : html`<p>${t("console.no_sub_areas")}</p>`}
    <div class="columns">
      <section><h2>${t("console.today")}</h2>
        ${h.today.length ? html`<ol class="today">${h.today.map((s) => html`<li key=${s.schedule + s.time}>
            <time>${s.time}</time> ${s.title || s.schedule} · ${s.area_name}</li>`)}</ol>`
          : html`<p>${t("console.nothing_today")}</p>`}</section>
      <section><h2>${t("console.faults")}</h2>
        ${h.faults.length ? html`<ul class="faults">${h.faults.map((f) => html`<li key=${f.device}>
            <span class=${f.status}>${word("status", f.status)}</span> ${f.name || f.device}
            · ${f.area} ${f.at ? html`· <time>${dateTime(f.at)}</time>` : ""}</li>`)}</ul>`
          : html`<p>${t("console.no_faults")}</p>`}</section>
    </div>`;
}
