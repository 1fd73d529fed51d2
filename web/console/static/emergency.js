// Emergency (users with the emergency right): choose areas and content, see what it would
// interrupt (POST /api/v1/emergencies/preview) as a step of its own, start it, then follow it
// live at #/emergency/ID: areas on air, loudspeakers and boards that acknowledged, and stop.
// Live through the one event stream: `emergency_status` (acks), `emergency` and `onair` reload
// the record, whose counts the server cuts to the caller's subtree.
import { useEffect, useRef, useState } from "preact/hooks";
import { html, t, half, word } from "./i18n.js";
import { api, session, ApiFailure } from "./api.js";
import { on } from "./live.js";
import { useSubmit, Field, FormError } from "./forms.js";
import { AreaPicker } from "./areapicker.js";
import { dateTime } from "./format.js";
import { goLive } from "./whip.js";

function message(e) {
  return e instanceof ApiFailure ? half(e.message) : t("console.network");
}

// The live voice of an emergency whose content is the microphone: this page publishes it over
// WHIP (the session cookie and CSRF header, like the air screen) to the emergency's targets; the
// record's `whip` address stays shown for an outside encoder (OBS, a studio).
function LiveVoice({ rec }) {
  const meter = useRef(null);
  const [voice, setVoice] = useState(null); // {stop} while the microphone is on air
  const [failure, setFailure] = useState("");
  useEffect(() => () => { voice?.stop(); }, [voice]); // leaving the page ends the voice
  const speak = async () => {
    setFailure("");
    try {
      setVoice(await goLive({ targets: rec.targets, klass: "emergency", title: rec.title,
                              onLevel: (v) => { if (meter.current) meter.current.value = v; },
                              onEnd: () => setVoice(null) }));
    } catch (e) {
      setFailure(e instanceof ApiFailure ? half(e.message)
                                         : t("console.air.no_mic", { error: e.message || e.name }));
    }
  };
  return html`<div class="em-voice">
    ${voice
      ? html`<p class="em-voice-state" role="status">${t("console.emergency.voice_on_air")}</p>
        <label for="em-level">${t("console.air.level")}</label>
        <meter id="em-level" ref=${meter} min="0" max="1" low="0.6" high="0.9" optimum="0.3"></meter>
        <button type="button" class="em-voice-stop" onClick=${() => voice.stop()}>${t("console.emergency.voice_stop")}</button>`
      : html`<button type="button" class="em-voice-start" onClick=${speak}>${t("console.emergency.voice_start")}</button>`}
    ${failure && html`<p class="error" role="alert">${failure}</p>`}
    <p class="em-note">${t("console.emergency.whip", { url: rec.whip })}</p></div>`;
}

// The request body from the form: the same for the preview and the start.
function draft(f, kind, targets) {
  if (!targets.length) {
    throw new ApiFailure(422, { error: t("console.emergency.no_targets"), field: "targets" });
  }
  const content = kind === "text" ? { text: f.get("text") }
    : kind === "media" ? { media: f.get("media") } : { live: true };
  return { targets, content, repeat: Number(f.get("repeat")), gap: Number(f.get("gap")),
           volume: Number(f.get("volume")) };
}

function ContentError({ failure }) {
  const mine = failure && String(failure.field || "").startsWith("content");
  return mine ? html`<p class="error" id="content-error" role="alert">${failure.message}</p>` : null;
}

// Text read by TTS, with a preview: the speech is made as a media item and played from the node.
function Speech({ failure }) {
  const [heard, setHeard] = useState(null); // media id of the previewed speech
  const [problem, setProblem] = useState("");
  const listen = async () => {
    const text = document.getElementById("em-text").value.trim();
    if (!text) { setProblem(t("console.emergency.text_first")); return; }
    try {
      setHeard((await api("POST", "/api/v1/tts", { text })).id);
      setProblem("");
    } catch (e) { setProblem(message(e)); }
  };
  const wrong = failure && String(failure.field || "").startsWith("content");
  return html`<label for="em-text">${t("console.emergency.text")}</label>
    <textarea id="em-text" name="text" rows="4" maxlength="5000" required
      aria-invalid=${wrong ? "true" : "false"} aria-describedby=${wrong ? "content-error" : undefined}
      onInput=${() => setHeard(null)}></textarea>
    <${ContentError} failure=${failure} />
    <button type="button" class="em-listen" onClick=${listen}>${t("console.emergency.listen")}</button>
    ${problem && html`<p class="error" role="alert">${problem}</p>`}
    ${heard && html`<audio controls autoplay class="em-preview" src=${`/api/v1/media/${encodeURIComponent(heard)}/audio`}
      aria-label=${t("console.emergency.preview_audio")}></audio>`}`;
}

function Library({ failure }) {
  const [items, setItems] = useState(null);
  const [problem, setProblem] = useState("");
  useEffect(() => {
    api("GET", "/api/v1/media").then((d) => setItems(d.media)).catch((e) => setProblem(message(e)));
  }, []);
  if (problem) return html`<p class="error" role="alert">${problem}</p>`;
  if (!items) return html`<p class="loading">${t("console.loading")}</p>`;
  if (!items.length) return html`<p>${t("console.emergency.no_media")}</p>`;
  return html`<label for="em-media">${t("console.emergency.media")}</label>
    <select id="em-media" name="media" required>
      ${items.map((m) => html`<option key=${m.id} value=${m.id}>${m.title || m.id}</option>`)}</select>
    <${ContentError} failure=${failure} />`;
}

function ContentChoice({ kind, setKind, failure }) {
  const kinds = [["text", t("console.emergency.kind_text")], ["media", t("console.emergency.kind_media")],
                 ["live", t("console.emergency.kind_live")]];
  return html`<fieldset class="em-content"><legend>${t("console.emergency.content")}</legend>
    <div class="em-kinds">${kinds.map(([k, label]) => html`<label key=${k}>
      <input type="radio" name="kind" value=${k} checked=${kind === k} onChange=${() => setKind(k)} />
      ${label}</label>`)}</div>
    ${kind === "text" && html`<${Speech} failure=${failure} />`}
    ${kind === "media" && html`<${Library} failure=${failure} />`}
    ${kind === "live" && html`<p class="em-note">${t("console.emergency.live_note")}</p>
      <${ContentError} failure=${failure} />`}
  </fieldset>`;
}

function Confirm({ plan, start, back }) {
  const p = plan.preview;
  return html`<section class="em-confirm" aria-labelledby="em-confirm-title">
    <h2 id="em-confirm-title">${t("console.emergency.confirm_title")}</h2>
    <p class="em-interrupts">${t("console.emergency.interrupts", { n: p.programmes, m: p.communes })}</p>
    <p>${t("console.emergency.reaches", { n: p.areas })}</p>
    ${p.interrupted.length > 0 && html`<ul class="em-rows">${p.interrupted.map((r) => html`
      <li key=${r.area}><strong>${r.name}</strong>: ${r.title || r.broadcast} (${word("class", r.class)})</li>`)}</ul>`}
    ${p.waits.length > 0 && html`<p class="em-waits">${t("console.emergency.waits", { n: p.waits.length })}</p>`}
    <form onSubmit=${start.submit} class="em-actions">
      ${start.failure && html`<p class="error" role="alert">${start.failure.message}</p>`}
      <button type="submit" class="em-go" disabled=${start.busy}>${t("console.emergency.go")}</button>
      <button type="button" class="em-back" onClick=${back}>${t("console.emergency.back")}</button>
    </form></section>`;
}

function Active() {
  const [list, setList] = useState([]);
  useEffect(() => {
    const load = () => api("GET", "/api/v1/emergencies").then((d) => setList(d.emergencies)).catch(() => {});
    load();
    const offs = [on("emergency", load), on("resync", load)];
    return () => offs.forEach((off) => off());
  }, []);
  if (!list.length) return null;
  return html`<section class="em-active" aria-labelledby="em-active-title">
    <h2 id="em-active-title">${t("console.emergency.active")}</h2>
    <ul>${list.map((e) => html`<li key=${e.id}><a href=${`#/emergency/${encodeURIComponent(e.id)}`}>
      ${e.title}</a> · ${dateTime(e.created)}</li>`)}</ul></section>`;
}

function Start() {
  const s = session.value;
  const [targets, setTargets] = useState([]);
  const [kind, setKind] = useState("text");
  const [plan, setPlan] = useState(null); // {body, preview}: the confirmation step
  const check = useSubmit(async (f) => {
    const body = draft(f, kind, targets);
    setPlan({ body, preview: await api("POST", "/api/v1/emergencies/preview", body) });
  });
  const start = useSubmit(async () => {
    const rec = await api("POST", "/api/v1/emergencies", plan.body);
    location.hash = `#/emergency/${encodeURIComponent(rec.id)}`;
  });
  const f = check.failure;
  // The form stays mounted (hidden) during the confirmation, so "back" finds it as it was.
  return html`<h1>${t("console.emergency.title")}</h1>
    <${Active} />
    <form onSubmit=${check.submit} class="em-form" hidden=${plan !== null}>
      <${AreaPicker} root=${s.area} value=${targets} onChange=${setTargets} name="targets"
        legend=${t("console.emergency.areas")} failure=${f} />
      <${ContentChoice} kind=${kind} setKind=${setKind} failure=${f} />
      <div class="em-numbers">
        <div><${Field} name="repeat" label=${t("console.emergency.repeat")} type="number" min="1"
          max="10" defaultValue="1" required failure=${f} /></div>
        <div><${Field} name="gap" label=${t("console.emergency.gap")} type="number" min="0"
          max="7200" step="1" defaultValue="3" required failure=${f} /></div>
        <div><${Field} name="volume" label=${t("console.emergency.volume")} type="number" min="0"
          max="100" defaultValue="100" required failure=${f} /></div>
      </div>
      <${FormError} failure=${f} />
      <button type="submit" class="em-next" disabled=${check.busy}>${t("console.emergency.next")}</button>
    </form>
    ${plan && html`<${Confirm} plan=${plan} start=${start} back=${() => setPlan(null)} />`}`;
}

function Count({ label, c, cls }) {
  return html`<div class=${`em-count ${cls}`}><dt>${label}</dt>
    <dd><strong>${c.acked}/${c.total}</strong></dd></div>`;
}

// Proof of delivery: loudspeakers that played it (reported hearing it while their area aired
// it), the missing ones named with the reason, and the whole table as CSV.
function Delivery({ id, d }) {
  return html`<section class="em-delivery" aria-labelledby="em-delivery-title">
    <h3 id="em-delivery-title">${t("console.emergency.delivery")}</h3>
    <p class="em-played" aria-live="polite"><strong>${t("console.emergency.played", { n: d.played, m: d.total })}</strong></p>
    ${d.missing_count > 0 && html`<table class="em-missing">
      <caption>${t("console.emergency.missing", { n: d.missing_count })}</caption>
      <thead><tr><th scope="col">${t("console.emergency.speaker")}</th>
        <th scope="col">${t("console.emergency.area")}</th>
        <th scope="col">${t("console.emergency.why")}</th></tr></thead>
      <tbody>${d.missing.map((m) => html`<tr key=${m.device}>
        <td><a href=${`#/devices/${encodeURIComponent(m.device)}`}>${m.name}</a></td>
        <td>${m.area_name}</td><td>${half(m.reason)}</td></tr>`)}</tbody></table>`}
    <p><a class="csv" href=${`/api/v1/reports/delivery?emergency=${encodeURIComponent(id)}&format=csv`}
      download=${`delivery-${id}.csv`}>${t("console.emergency.delivery_csv")}</a></p>
  </section>`;
}

function Live({ id }) {
  const s = session.value;
  const [rec, setRec] = useState(null);
  const [failure, setFailure] = useState("");
  const [stopFailure, setStopFailure] = useState("");
  const areas = useRef(new Set());
  const reload = useRef(null);
  useEffect(() => {
    let timer = null;
    const load = async () => {
      try {
        const r = await api("GET", `/api/v1/emergencies/${encodeURIComponent(id)}`);
        areas.current = new Set(r.areas);
        setRec(r); setFailure("");
      } catch (e) { setFailure(message(e)); }
    };
    reload.current = load;
    const soon = () => { clearTimeout(timer); timer = setTimeout(load, 150); }; // a burst, one read
    load();
    const offs = [on("emergency_status", (ev) => ev.id === id && soon()),
                  on("emergency", (ev) => ev.id === id && soon()),
                  // before the first answer names the areas, any change may be one of them
                  on("onair", (ev) => (!areas.current.size || areas.current.has(ev.area)) && soon()),
                  on("resync", load)];
    return () => { clearTimeout(timer); offs.forEach((off) => off()); };
  }, [id]);
  if (!rec) return html`<h1>${t("console.emergency.title")}</h1>
    ${failure ? html`<p class="error" role="alert">${failure}</p>` : html`<p class="loading">${t("console.loading")}</p>`}`;
  const st = rec.reach;
  const above = s.area.path.find((a) => a.code === rec.issuer && a.code !== s.area.code);
  const stop = async () => {
    try {
      await api("DELETE", `/api/v1/emergencies/${encodeURIComponent(id)}`);
      setStopFailure("");
      await reload.current();
    } catch (e) { setStopFailure(message(e)); }
  };
  const ended = rec.status !== "active";
  return html`<h1>${t("console.emergency.title")}</h1>
    <section class=${`em-live ${ended ? "ended" : "on"}`} aria-labelledby="em-live-title">
      <h2 id="em-live-title">${rec.title}</h2>
      <p class="em-state" role="status">${ended
        ? t("console.emergency.ended_at", { at: dateTime(rec.ended) || "" })
        : t("console.emergency.on_air_in", { n: st.on_air.length, m: st.areas })}</p>
      <dl class="em-counts" aria-live="polite">
        <${Count} label=${t("console.emergency.speakers")} c=${st.loudspeakers} cls="em-speakers" />
        <${Count} label=${t("console.emergency.boards")} c=${st.boards} cls="em-boards" />
      </dl>
      ${rec.delivery && html`<${Delivery} id=${id} d=${rec.delivery} />`}
      ${st.on_air.length > 0 && html`<ul class="em-areas" aria-label=${t("console.emergency.areas_on_air")}>
        ${st.on_air.map((a) => html`<li key=${a.code}>${a.name}</li>`)}</ul>`}
      <p class="em-meta">${t("console.emergency.started", { at: dateTime(rec.created), who: rec.user })}</p>
      ${rec.whip && !ended && html`<${LiveVoice} rec=${rec} />`}
      ${failure && html`<p class="error" role="alert">${failure}</p>`}
      ${!ended && html`<div class="em-actions">
        <button type="button" class="em-stop" onClick=${stop} disabled=${Boolean(above)}
          aria-describedby=${above || stopFailure ? "em-stop-why" : undefined}>${t("console.emergency.stop")}</button>
        ${(above || stopFailure) && html`<p class="error" id="em-stop-why" role="alert">${stopFailure
          || t("console.emergency.stop_above", { issuer: above.name })}</p>`}</div>`}
      <p><a href="#/emergency">${t("console.emergency.new")}</a></p>
    </section>`;
}

export function Emergency({ id }) {
  return id ? html`<${Live} id=${id} />` : html`<${Start} />`;
}
