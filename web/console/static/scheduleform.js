// A new schedule: an approved programme, target areas (the shared area picker), once / daily /
// weekly with a date range. Saving asks the server first (?dry_run=1): conflicts are shown and
// nothing is stored until the operator confirms. A 422/403 naming a field shows under it.
import { useEffect, useRef, useState } from "preact/hooks";
import { html, t, word } from "./i18n.js";
import { api, session } from "./api.js";
import { useSubmit, Field, FormError } from "./forms.js";
import { AreaPicker } from "./areapicker.js";
import { dateTime, isoDay } from "./format.js";

const KINDS = ["once", "daily", "weekly"];
const WEEKDAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const CLASSES = ["normal", "priority", "background"];

export function weekdayName(d) {
  return { mon: t("console.schedule.mon"), tue: t("console.schedule.tue"),
           wed: t("console.schedule.wed"), thu: t("console.schedule.thu"),
           fri: t("console.schedule.fri"), sat: t("console.schedule.sat"),
           sun: t("console.schedule.sun") }[d];
}

export function kindName(k) {
  return { once: t("console.schedule.once"), daily: t("console.schedule.daily"),
           weekly: t("console.schedule.weekly") }[k] ?? k;
}

function conflictText(c) {
  return t("console.schedule.conflict_with", {
    title: c.title || c.schedule, area: c.area_name || "?", at: dateTime(c.at) });
}

// Dates are typed dd/mm/yyyy and times HH:MM[:SS] (text fields: a browser's own date and time
// pickers follow its locale, 12-hour clock included). The API gets yyyy-mm-dd; what does not
// parse goes as typed, for the API to refuse under its field.
export const shown = (iso) => iso.split("-").reverse().join("/");

const isoDate = (text) => isoDay(text) ?? text.trim(); // what does not parse: the API says why

function body(f, kind, targets) {
  const day = (name) => (f.get(name).trim() ? isoDate(f.get(name)) : null);
  const out = { programme: f.get("programme"), targets, kind, time: f.get("time").trim(),
                class: f.get("class") };
  if (kind === "once") out.date = day("date");
  if (kind === "weekly") out.weekdays = f.getAll("weekdays");
  if (kind !== "once") { out.from = day("from"); out.until = day("until"); }
  return out;
}

const DATE_INPUT = { type: "text", inputmode: "numeric", autocomplete: "off" };

function Problem({ name, failure }) {
  return failure && failure.field === name
    ? html`<p class="error" id=${`${name}-error`} role="alert">${failure.message}</p>` : null;
}

const described = (name, failure) => (failure && failure.field === name
  ? { "aria-invalid": "true", "aria-describedby": `${name}-error` } : {});

export function ScheduleForm({ area, day, saved }) {
  const [programmes, setProgrammes] = useState(null);
  const [targets, setTargets] = useState([area]);
  const [kind, setKind] = useState("once");
  const [pending, setPending] = useState(null); // {body, conflicts} awaiting the operator
  const [stored, setStored] = useState(false);
  useEffect(() => {
    api("GET", "/api/v1/programmes?status=approved").then((d) => setProgrammes(d.programmes))
      .catch(() => setProgrammes([]));
  }, []);
  useEffect(() => setTargets([area]), [area]);
  const force = useRef(false); // "save anyway" pressed: store what was checked
  const check = useSubmit(async (f, form) => {
    setStored(false);
    if (force.current && pending) {
      force.current = false;
      await api("POST", "/api/v1/schedules", pending.body);
    } else {
      setPending(null);
      const b = body(f, kind, targets);
      const answer = await api("POST", "/api/v1/schedules?dry_run=1", b);
      if (answer.conflicts.length) { setPending({ body: b, conflicts: answer.conflicts }); return; }
      await api("POST", "/api/v1/schedules", b);
    }
    setPending(null); setStored(true); form.elements.time.value = ""; saved();
  });
  const failure = check.failure;
  if (!programmes) return html`<p class="loading">${t("console.loading")}</p>`;
  if (!programmes.length) return html`<p class="note">${t("console.schedule.no_programmes")}</p>`;
  return html`<form class="schedule-form" onSubmit=${check.submit} novalidate>
    <label for="programme">${t("console.schedule.programme")}</label>
    <select id="programme" name="programme" ...${described("programme", failure)}>
      ${programmes.map((p) => html`<option key=${p.id} value=${p.id}>${p.title}</option>`)}</select>
    <${Problem} name="programme" failure=${failure} />
    <${AreaPicker} root=${session.value.area} value=${targets} onChange=${setTargets}
      legend=${t("console.schedule.targets")} name="targets" failure=${failure} />
    <fieldset class="kinds" id="kind"><legend>${t("console.schedule.repeat")}</legend>
      ${KINDS.map((k) => html`<span class="choice" key=${k}>
        <input type="radio" id=${`kind-${k}`} name="kind" value=${k} checked=${kind === k}
          onChange=${() => setKind(k)} /><label for=${`kind-${k}`}>${kindName(k)}</label></span>`)}
    </fieldset>
    ${kind === "once" && html`<${Field} name="date" ...${DATE_INPUT} label=${t("console.schedule.on_date")}
        defaultValue=${shown(day)} failure=${failure} />`}
    <${Field} name="time" type="text" inputmode="numeric" autocomplete="off"
      label=${t("console.schedule.time")} required failure=${failure} />
    ${kind === "weekly" && html`<fieldset class="weekdays" id="weekdays" ...${described("weekdays", failure)}>
        <legend>${t("console.schedule.weekdays")}</legend>
        ${WEEKDAYS.map((d) => html`<span class="choice" key=${d}>
          <input type="checkbox" id=${`weekday-${d}`} name="weekdays" value=${d} />
          <label for=${`weekday-${d}`}>${weekdayName(d)}</label></span>`)}
        <${Problem} name="weekdays" failure=${failure} /></fieldset>`}
    ${kind !== "once" && html`<${Field} name="from" ...${DATE_INPUT} label=${t("console.schedule.from")}
        failure=${failure} />
      <${Field} name="until" ...${DATE_INPUT} label=${t("console.schedule.until")} failure=${failure} />`}
    <label for="class">${t("console.schedule.class")}</label>
    <select id="class" name="class" ...${described("class", failure)}>
      ${CLASSES.map((c) => html`<option key=${c} value=${c}>${word("class", c)}</option>`)}</select>
    <${Problem} name="class" failure=${failure} />
    <${FormError} failure=${failure} />
    ${stored && html`<p class="ok" role="status">${t("console.schedule.saved")}</p>`}
    <button type="submit" disabled=${check.busy}>${t("console.schedule.save")}</button>
    ${pending && html`<section class="conflicts" role="alert">
        <h3>${t("console.schedule.conflicts", { n: pending.conflicts.length })}</h3>
        <ul>${pending.conflicts.map((c) => html`<li key=${c.schedule}>${conflictText(c)}</li>`)}</ul>
        <p>${t("console.schedule.not_stored")}</p>
        <button type="submit" class="save-anyway" disabled=${check.busy}
          onClick=${() => { force.current = true; }}>${t("console.schedule.save_anyway")}</button>
        <button type="button" class="cancel" onClick=${() => setPending(null)}>
          ${t("console.schedule.cancel")}</button></section>`}
  </form>`;
}
