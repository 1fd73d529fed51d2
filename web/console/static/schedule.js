// Schedule calendar: an area's airings day by day (GET /api/v1/schedules/calendar, expanded by
// the server in Asia/Ho_Chi_Minh), a day or a week, as a list per day on the phone and seven
// columns on a wide screen. What a higher level scheduled for the area shows read-only with the
// reason; the caller's own schedules can be turned off/on or deleted. Live: any `schedule`
// event or a resync reloads the view.
import { useEffect, useRef, useState } from "preact/hooks";
import { html, t, half, word } from "./i18n.js";
import { api, session, ApiFailure } from "./api.js";
import { on } from "./live.js";
import { date, time, isoDay } from "./format.js";
import { ScheduleForm, weekdayName, kindName, shown } from "./scheduleform.js";
import { Airtime } from "./airtime.js";

// Calendar dates as "yyyy-mm-dd" strings; arithmetic in UTC, where a day is always 24 h.
function addDays(iso, n) {
  const d = new Date(`${iso}T00:00:00Z`);
  d.setUTCDate(d.getUTCDate() + n);
  return d.toISOString().slice(0, 10);
}
const monday = (iso) => addDays(iso, -((new Date(`${iso}T00:00:00Z`).getUTCDay() + 6) % 7));
const today = () => date(Date.now() / 1000).split("/").reverse().join("-");

const failed = (e) => (e instanceof ApiFailure ? half(e.message) : t("console.network"));

function Airing({ item, reload }) {
  const [asking, setAsking] = useState(false);
  const [failure, setFailure] = useState("");
  const act = async (method, body) => {
    try {
      await api(method, `/api/v1/schedules/${encodeURIComponent(item.schedule)}`, body);
      setFailure(""); setAsking(false); reload();
    } catch (e) { setFailure(failed(e)); }
  };
  const canAir = session.value.rights.includes("air");
  const why = canAir ? t("console.schedule.above", { name: item.area_name })
                     : t("console.schedule.no_air_right");
  return html`<li class=${`airing class-${item.class}${item.enabled ? "" : " off"}`}
      data-schedule=${item.schedule} data-mine=${item.mine ? "1" : "0"}>
    <time datetime=${new Date(item.at * 1000).toISOString()}>${time(item.at)}</time>
    <strong class="title">${item.title || item.programme}</strong>
    <span class="meta">${kindName(item.kind)} · ${word("class", item.class)} · ${item.area_name}</span>
    ${!item.enabled && html`<span class="state">${t("console.schedule.is_off")}</span>`}
    ${item.mine
      ? html`<span class="actions">
          <button type="button" class="toggle" onClick=${() => act("PATCH", { enabled: !item.enabled })}>
            ${item.enabled ? t("console.schedule.turn_off") : t("console.schedule.turn_on")}</button>
          ${asking
            ? html`<button type="button" class="confirm-delete" onClick=${() => act("DELETE")}>
                ${t("console.schedule.delete_confirm")}</button>
              <button type="button" onClick=${() => setAsking(false)}>${t("console.schedule.keep")}</button>`
            : html`<button type="button" class="delete" onClick=${() => setAsking(true)}>
                ${t("console.schedule.delete")}</button>`}</span>`
      : html`<span class="readonly">${why}</span>`}
    ${failure && html`<p class="error" role="alert">${failure}</p>`}
  </li>`;
}

function Day({ day, reload }) {
  return html`<li class="day" data-date=${day.date}>
    <h3>${weekdayName(day.weekday)} <span class="date">${shown(day.date)}</span></h3>
    ${day.items.length
      ? html`<ol class="airings">${day.items.map((it) => html`<${Airing}
          key=${it.schedule + it.at} item=${it} reload=${reload} />`)}</ol>`
      : html`<p class="empty">${t("console.schedule.nothing")}</p>`}</li>`;
}

function useAreas(root) {
  const [areas, setAreas] = useState([root]);
  useEffect(() => {
    api("GET", `/api/v1/areas?parent=${encodeURIComponent(root.code)}`)
      .then((data) => setAreas([root, ...data.areas])).catch(() => setAreas([root]));
  }, [root.code]);
  return areas;
}

export function Schedule({ area }) {
  const s = session.value;
  const areas = useAreas(s.area);
  const [view, setView] = useState("day");
  const [day, setDay] = useState(today());
  const [typed, setTyped] = useState(null); // the date field while it is not a whole date
  const [data, setData] = useState(null);
  const [failure, setFailure] = useState("");
  const first = view === "week" ? monday(day) : day;
  const latest = useRef(0); // an answer to an older request (a day or view since left) is dropped
  const load = () => {
    const asked = ++latest.current;
    return api("GET", `/api/v1/schedules/calendar?area=${encodeURIComponent(area)}`
                      + `&from=${first}&days=${view === "week" ? 7 : 1}`)
      .then((d) => { if (asked === latest.current) { setData(d); setFailure(""); } })
      .catch((e) => { if (asked === latest.current) setFailure(failed(e)); });
  };
  useEffect(() => {
    load();
    const offs = [on("schedule", load), on("resync", load)];
    return () => offs.forEach((off) => off());
  }, [area, first, view]);
  const step = view === "week" ? 7 : 1;
  const pick = (code) => { location.hash = `#/schedule/${encodeURIComponent(code)}`; };
  return html`<h1>${t("console.schedule")}${data && html`: <span class="area">${data.area_name}</span>`}</h1>
    ${failure && html`<p class="error" role="alert">${failure}</p>`}
    <div class="schedule-controls">
      <span class="field"><label for="sched-area">${t("console.schedule.area")}</label>
        <select id="sched-area" value=${area} onChange=${(e) => pick(e.target.value)}>
          ${areas.map((a) => html`<option key=${a.code} value=${a.code}>${a.name}</option>`)}
        </select></span>
      <span class="views" role="group" aria-label=${t("console.schedule.view")}>
        <button type="button" aria-pressed=${view === "day" ? "true" : "false"}
          onClick=${() => setView("day")}>${t("console.schedule.day_view")}</button>
        <button type="button" aria-pressed=${view === "week" ? "true" : "false"}
          onClick=${() => setView("week")}>${t("console.schedule.week_view")}</button></span>
      <span class="field"><label for="sched-day">${t("console.schedule.date")}</label>
        <input type="text" inputmode="numeric" autocomplete="off" id="sched-day"
          value=${typed ?? shown(day)} onInput=${(e) => {
            const iso = isoDay(e.target.value);
            if (iso) {
              setDay(iso); setTyped(null);
            } else setTyped(e.target.value);
          }} /></span>
      <span class="steps">
        <button type="button" class="previous" aria-label=${t("console.schedule.previous")}
          onClick=${() => { setTyped(null); setDay(addDays(day, -step)); }}>‹</button>
        <button type="button" class="today" onClick=${() => { setTyped(null); setDay(today()); }}>${t("console.schedule.today")}</button>
        <button type="button" class="next" aria-label=${t("console.schedule.next")}
          onClick=${() => { setTyped(null); setDay(addDays(day, step)); }}>›</button></span>
    </div>
    ${data ? html`<ol class=${`calendar ${view}`} aria-label=${t("console.schedule.calendar")}>
        ${data.days.map((d) => html`<${Day} key=${d.date} day=${d} reload=${load} />`)}</ol>`
      : !failure && html`<p class="loading">${t("console.loading")}</p>`}
    <h2>${t("console.schedule.new")}</h2>
    ${s.rights.includes("air")
      ? html`<${ScheduleForm} area=${area} day=${day} saved=${load} />`
      : html`<p class="note">${t("console.schedule.no_air_right")}</p>`}
    <${Airtime} area=${area} canEdit=${s.rights.includes("air")} />`;
}
