// Air now and go live: targets from the area tree and a class the user may use, then an approved
// programme now (POST /api/v1/broadcasts) or the browser microphone over WHIP (whip.js). Where
// each broadcast of the user's area is actually heard comes from GET /api/v1/broadcasts and the
// live `onair` events: per target area, heard, or preempted by the programme that wins there.
import { signal, effect } from "@preact/signals";
import { useEffect, useRef, useState } from "preact/hooks";
import { html, t, half, word } from "./i18n.js";
import { api, session, ApiFailure } from "./api.js";
import { on } from "./live.js";
import { useSubmit, Field, FormError } from "./forms.js";
import { AreaPicker, areaName } from "./areapicker.js";
import { goLive } from "./whip.js";

const targets = signal([]);
const klass = signal("normal");
const programmes = signal(null); // approved programmes, null while loading
const onAir = signal({}); // area code -> who is on air there ({broadcast, title, class, issuer})
const broadcasts = signal([]); // on-air broadcasts issued by the user's area
const live = signal(null); // {phase: "connecting" | "on", broadcast, stop} while going live
const failure = signal(""); // loading the screen's data failed
let meter = null; // the <meter> element: set each animation frame, not through a render

function problem(e) {
  return e instanceof ApiFailure ? half(e.message) : t("console.network");
}

async function reload() {
  const mine = live.value; // as it was before asking: a later one may not be listed yet
  try {
    const data = await api("GET", "/api/v1/broadcasts");
    onAir.value = Object.fromEntries(data.areas.map((a) => [a.area, a]));
    const area = session.value.area.code;
    broadcasts.value = data.broadcasts.filter((b) => b.issuer === area);
    // a live broadcast stopped elsewhere (another operator, the API) ends the microphone here
    if (mine?.phase === "on" && live.value === mine
        && !data.broadcasts.some((b) => b.id === mine.broadcast)) endLive();
    failure.value = "";
  } catch (e) { failure.value = problem(e); }
}

function later(fn, ms) {
  let timer = null;
  return () => { clearTimeout(timer); timer = setTimeout(fn, ms); };
}

function endLive() {
  live.value?.close?.();
  live.value = null;
}

// Logging out ends a live broadcast (its peer closes, so the node ends it) and forgets the
// choices: the next user of this browser starts from nothing.
effect(() => {
  if (session.value) return;
  endLive();
  targets.value = [];
  klass.value = "normal";
  broadcasts.value = [];
  onAir.value = {};
});

function classes(s) {
  return ["normal", "priority", ...(s.rights.includes("emergency") ? ["emergency"] : [])];
}

// Heard in `code`, or who preempts it there.
function Where({ b, code }) {
  const now = onAir.value[code];
  const heard = now && (now.broadcast === b.id || (now.overlays || []).includes(b.id));
  let state = t("console.not_on_air");
  if (heard) state = t("console.air.heard");
  else if (now?.broadcast) {
    state = t("console.air.preempted", { title: now.title || now.broadcast,
                                        class: word("class", now.class),
                                        issuer: areaName(now.issuer) });
  }
  return html`<li data-code=${code} class=${heard ? "heard" : now?.broadcast ? "preempted" : "idle"}>
    <span class="place">${areaName(code)}</span> <span class="state">${state}</span></li>`;
}

// Proof of delivery: loudspeakers of its targets that played it (GET /api/v1/broadcasts/{id}),
// read again when what is on air changes, and once more when their reports have come in.
function Played({ b }) {
  const [d, setD] = useState(null);
  const changed = onAir.value;
  useEffect(() => {
    let gone = false;
    const load = () => api("GET", `/api/v1/broadcasts/${encodeURIComponent(b.id)}`)
      .then((r) => { if (!gone) setD(r.delivery); }, () => {});
    load();
    const timer = setTimeout(load, 2000);
    return () => { gone = true; clearTimeout(timer); };
  }, [b.id, changed]);
  if (!d || !d.total) return null;
  return html`<p class="played">${t("console.emergency.played", { n: d.played, m: d.total })}
    · <a class="csv" href=${`/api/v1/reports/delivery?broadcast=${encodeURIComponent(b.id)}&format=csv`}
      download=${`delivery-${b.id}.csv`}>${t("console.air.delivery_csv")}</a></p>`;
}

function Broadcast({ b, mayEmergency }) {
  const stop = useSubmit(async () => {
    if (live.value?.broadcast === b.id) { await live.value.stop(); live.value = null; } else {
      await api("DELETE", `/api/v1/broadcasts/${encodeURIComponent(b.id)}`);
    }
    await reload();
  });
  const locked = b.class === "emergency" && !mayEmergency;
  return html`<li class="broadcast" data-broadcast=${b.id}>
    <strong>${b.title || b.id}</strong>
    <span class="why">${word("class", b.class)}${b.user ? ` · ${b.user}` : ""}</span>
    <ul class="where">${b.targets.map((c) => html`<${Where} key=${c} b=${b} code=${c} />`)}</ul>
    <${Played} b=${b} />
    <form class="stop" onSubmit=${stop.submit}>
      <button type="submit" disabled=${locked || stop.busy}
        aria-label=${t("console.air.stop_named", { title: b.title || b.id })}>${t("console.air.stop")}</button>
      ${locked && html`<span class="reason">${t("console.air.stop_needs_emergency")}</span>`}
      <${FormError} failure=${stop.failure} /></form></li>`;
}

function StartProgramme({ start }) {
  const list = programmes.value;
  if (list === null) return html`<p class="loading">${t("console.loading")}</p>`;
  const wrong = start.failure?.field === "programme";
  return html`<form class="air-now" onSubmit=${start.submit}>
    <h2>${t("console.air.programme_now")}</h2>
    ${list.length === 0 ? html`<p>${t("console.air.no_programmes")}</p>` : html`
      <label for="programme">${t("console.air.programme")}</label>
      <select id="programme" name="programme" aria-invalid=${wrong ? "true" : "false"}
        aria-describedby=${wrong ? "programme-error" : undefined}>${list.map((p) => html`<option
        key=${p.id} value=${p.id}>${p.title}</option>`)}</select>`}
    ${wrong && html`<p class="error" id="programme-error" role="alert">${start.failure.message}</p>`}
    <${FormError} failure=${start.failure} />
    ${start.done && html`<p class="ok" role="status">${t("console.air.started")}</p>`}
    <button type="submit" disabled=${start.busy || list.length === 0}>${t("console.air.start")}</button>
  </form>`;
}

function OnAirNow() {
  const level = useRef(null);
  useEffect(() => { meter = level.current; return () => { meter = null; }; });
  const stop = useSubmit(async () => { await live.value?.stop(); live.value = null; await reload(); });
  const airing = live.value.phase === "on";
  return html`<section class=${`live ${live.value.phase}`} aria-labelledby="live-state">
    <p id="live-state" class="on-air-state" role="status">
      ${airing ? t("console.air.on_air") : t("console.air.connecting")}</p>
    <p class="live-what">${`${live.value.title || t("console.air.live_title_hint")} · ${
      live.value.targets.map(areaName).join(", ")}`}</p>
    <label for="level">${t("console.air.level")}</label>
    <meter id="level" class="level" ref=${level} min="0" max="1" low="0.6" high="0.9" optimum="0.3"></meter>
    <form onSubmit=${stop.submit}><button type="submit" class="stop-live"
      disabled=${!airing || stop.busy}>${t("console.air.stop_live")}</button>
      <${FormError} failure=${stop.failure} /></form></section>`;
}

function GoLive({ go }) {
  if (live.value) return null; // the ON AIR panel heads the screen instead
  const elsewhere = go.failure && ["class", "targets"].includes(go.failure.field);
  return html`<form class="live" onSubmit=${go.submit}><h2>${t("console.air.live")}</h2>
    <${Field} name="title" label=${t("console.air.live_title")} failure=${go.failure}
      maxlength="200" placeholder=${t("console.air.live_title_hint")} />
    <${FormError} failure=${elsewhere ? null : go.failure} />
    <button type="submit" class="go-live" disabled=${go.busy}>${t("console.air.go_live")}</button>
  </form>`;
}

async function startLive(form) {
  if (!targets.value.length) { // no WHIP address without a target: said where the API says it
    throw new ApiFailure(422, { error: t("console.air.no_targets"), field: "targets" });
  }
  const what = { title: form.get("title").trim(), targets: targets.value };
  live.value = { phase: "connecting", ...what };
  try {
    const handle = await goLive({
      targets: what.targets, klass: klass.value, title: what.title,
      onLevel: (v) => { if (meter) meter.value = v; },
      onEnd: () => { live.value = null; reload(); },
    });
    live.value = { phase: "on", ...what, ...handle };
  } catch (e) {
    live.value = null;
    if (e instanceof ApiFailure) throw e;
    throw new ApiFailure(0, { error: t("console.air.no_mic", { error: e.message || e.name }) });
  }
  await reload();
}

async function startProgramme(form) {
  await api("POST", "/api/v1/broadcasts", { programme: form.get("programme") || null,
                                            targets: targets.value, class: klass.value });
  await reload();
}

function ClassChoice({ choices, wrong }) {
  return html`<div class="air-class">
    <label for="class">${t("console.air.class")}</label>
    <select id="class" value=${klass.value} onChange=${(e) => { klass.value = e.target.value; }}
      aria-invalid=${wrong ? "true" : "false"}
      aria-describedby=${wrong ? "class-error" : choices.includes("emergency") ? undefined : "class-note"}>
      ${choices.map((c) => html`<option key=${c} value=${c}>${word("class", c)}</option>`)}</select>
    ${wrong ? html`<p class="error" id="class-error" role="alert">${wrong.message}</p>`
      : !choices.includes("emergency") && html`<p class="note" id="class-note">${t("console.air.no_emergency")}</p>`}
  </div>`;
}

export function Air() {
  const s = session.value;
  const last = useRef("start"); // which action's refusal the shared fields show
  const start = useSubmit((form) => { last.current = "start"; return startProgramme(form); });
  const go = useSubmit((form) => { last.current = "live"; return startLive(form); });
  useEffect(() => {
    reload();
    api("GET", "/api/v1/programmes?status=approved")
      .then((d) => { programmes.value = d.programmes; })
      .catch((e) => { programmes.value = []; failure.value = problem(e); });
    const soon = later(reload, 300); // the broadcast list, once a burst of changes is over
    const offs = [on("onair", (ev) => { onAir.value = { ...onAir.value, [ev.area]: ev }; soon(); }),
                  on("resync", reload)];
    return () => offs.forEach((off) => off());
  }, []);
  const choices = classes(s);
  if (!choices.includes(klass.value)) klass.value = "normal";
  const shown = (last.current === "start" ? start : go).failure;
  const at = (name) => (shown && shown.field === name ? shown : null);
  return html`<h1>${t("console.air.title")}</h1>
    ${live.value && html`<${OnAirNow} />`}
    ${failure.value && html`<p class="error" role="alert">${failure.value}</p>`}
    <div class="air">
      <${AreaPicker} root=${s.area} value=${targets.value} legend=${t("console.air.targets")}
        onChange=${(c) => { targets.value = c; }} failure=${at("targets")} />
      <${ClassChoice} choices=${choices} wrong=${at("class")} />
      <div class="air-actions"><${StartProgramme} start=${start} /><${GoLive} go=${go} /></div>
    </div>
    <section class="mine"><h2>${t("console.air.mine", { area: s.area.name })}</h2>
      ${broadcasts.value.length === 0 ? html`<p>${t("console.air.none")}</p>`
        : html`<ul class="broadcasts">${broadcasts.value.map((b) => html`<${Broadcast} key=${b.id}
            b=${b} mayEmergency=${s.rights.includes("emergency")} />`)}</ul>`}</section>`;
}
