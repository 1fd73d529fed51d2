// Quiet hours and volume by time of day of one area (GET/PUT/DELETE /api/v1/areas/{code}/airtime),
// under the area's schedule: when normal and background programmes may air, and how loud, in a
// form of plain times and percentages. Emergencies and priority bulletins are exempt (server).
import { useEffect, useState } from "preact/hooks";
import { html, t, half } from "./i18n.js";
import { api, ApiFailure } from "./api.js";

const ROWS = 3; // volume rows shown; empty ones are left out

function ruleOf(form) {
  const get = (k) => (form.get(k) || "").trim();
  const hours = get("airtime.hours[0]") || get("airtime.hours[0].to")
    ? [[get("airtime.hours[0]"), get("airtime.hours[0].to")]] : [];
  const volume = [];
  for (let i = 0; i < ROWS; i++) {
    const [from, to, pct] = ["from", "to", "percent"].map((k) => get(`airtime.volume[${i}].${k}`));
    if (from || to || pct) {
      volume.push({ from, to, percent: /^\d+$/.test(pct) ? Number(pct) : pct });
    }
  }
  return { hours, volume };
}

function Input({ name, label, value, failure, ...rest }) {
  const wrong = failure && failure.field === name;
  return html`<span class="field"><label for=${name}>${label}</label>
    <input id=${name} name=${name} defaultValue=${value ?? ""} autocomplete="off"
      aria-invalid=${wrong ? "true" : "false"}
      aria-describedby=${wrong ? `${name}-error` : undefined} ...${rest} />
    ${wrong && html`<p class="error" id=${`${name}-error`} role="alert">${failure.message}</p>`}</span>`;
}

export function Airtime({ area, canEdit }) {
  const [view, setView] = useState(null);
  const [failure, setFailure] = useState(null); // {field, message}
  const [saved, setSaved] = useState(false);
  const [version, setVersion] = useState(0); // remounts the inputs after a load
  const load = () => api("GET", `/api/v1/areas/${encodeURIComponent(area)}/airtime`)
    .then((v) => { setView(v); setVersion((n) => n + 1); })
    .catch((e) => setFailure({ field: null, message: e instanceof ApiFailure ? half(e.message) : t("console.network") }));
  useEffect(() => { setSaved(false); setFailure(null); load(); }, [area]);
  const send = async (method, body) => {
    setSaved(false);
    try {
      setView(await api(method, `/api/v1/areas/${encodeURIComponent(area)}/airtime`, body));
      setVersion((n) => n + 1); setFailure(null); setSaved(true);
    } catch (e) {
      setFailure(e instanceof ApiFailure ? { field: e.field, message: half(e.message) }
                                         : { field: null, message: t("console.network") });
    }
  };
  if (!view) return null;
  const rule = view.effective || { hours: [], volume: [] };
  const known = (f) => f && (f.startsWith("airtime.hours[0]") || /^airtime\.volume\[\d\]\.(from|to|percent)$/.test(f));
  const general = failure && !known(failure.field);
  const source = view.from === null ? t("console.airtime.none")
    : view.from === area ? t("console.airtime.own") : t("console.airtime.inherited", { area: view.from });
  return html`<section class="airtime" aria-labelledby="airtime-title">
    <h2 id="airtime-title">${t("console.airtime")}</h2>
    <p class="airtime-help">${t("console.airtime.help")}</p>
    <p class="airtime-source">${source}</p>
    <form class="airtime-form" key=${version} onSubmit=${(ev) => {
      ev.preventDefault(); send("PUT", ruleOf(new FormData(ev.target)));
    }}>
      <fieldset disabled=${!canEdit}><legend>${t("console.airtime.hours")}</legend>
        <${Input} name="airtime.hours[0]" label=${t("console.airtime.from")} placeholder="05:00"
          value=${rule.hours[0]?.[0]} failure=${failure} inputmode="numeric" />
        <${Input} name="airtime.hours[0].to" label=${t("console.airtime.to")} placeholder="21:00"
          value=${rule.hours[0]?.[1]} failure=${failure} inputmode="numeric" />
      </fieldset>
      <fieldset disabled=${!canEdit}><legend>${t("console.airtime.volume")}</legend>
        ${[...Array(ROWS).keys()].map((i) => html`<div class="airtime-row" key=${i}>
          <${Input} name=${`airtime.volume[${i}].from`} label=${t("console.airtime.from")}
            value=${rule.volume[i]?.from} failure=${failure} inputmode="numeric" />
          <${Input} name=${`airtime.volume[${i}].to`} label=${t("console.airtime.to")}
            value=${rule.volume[i]?.to} failure=${failure} inputmode="numeric" />
          <${Input} name=${`airtime.volume[${i}].percent`} label=${t("console.airtime.percent")}
            value=${rule.volume[i]?.percent} failure=${failure} inputmode="numeric" />
        </div>`)}
      </fieldset>
      ${general && html`<p class="error" role="alert">${failure.message}</p>`}
      ${saved && html`<p class="ok" role="status">${t("console.airtime.saved")}</p>`}
      ${canEdit && html`<button type="submit">${t("console.airtime.save")}</button>
        ${view.own && html`<button type="button" class="inherit"
          onClick=${() => send("DELETE")}>${t("console.airtime.inherit")}</button>`}`}
    </form></section>`;
}
