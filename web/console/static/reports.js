// Reports: the as-run log of an area's subtree for a span of days and a class, hours on air per
// area and class and bulletins per day as SVG bar charts (each bar titled, the same numbers in a
// table for screen readers), and the API's own CSV for the same filters: a plain link, the
// session cookie authenticates it. Reloaded when something goes on or off air.
import { useEffect, useState } from "preact/hooks";
import { html, t, half, word } from "./i18n.js";
import { api, session, ApiFailure } from "./api.js";
import { useSubmit, Field, FormError } from "./forms.js";
import { on } from "./live.js";
import { date, dateTime, isoDay } from "./format.js";
import { Availability } from "./availability.js";

const CLASSES = ["emergency", "priority", "normal", "background"];
const SHOWN_ROWS = 500; // the rest is in the CSV
const DAY = 86400;

function duration(hours) {
  const s = Math.round(hours * 3600);
  const pad = (n) => String(n).padStart(2, "0");
  return `${Math.floor(s / 3600)}:${pad(Math.floor(s / 60) % 60)}:${pad(s % 60)}`;
}

// The filters as the API's query: `to` is the day after the last day asked for.
function query(f) {
  const from = isoDay(f.get("from"));
  if (!from) throw new ApiFailure(422, { error: t("console.reports.bad_date"), field: "from" });
  const to = isoDay(f.get("to"), 1);
  if (!to) throw new ApiFailure(422, { error: t("console.reports.bad_date"), field: "to" });
  const q = new URLSearchParams({ from, to, area: f.get("area") });
  if (f.get("class")) q.set("class", f.get("class"));
  return q.toString();
}

function HoursChart({ hours, names }) {
  const areas = Object.keys(hours);
  const total = (a) => Object.values(hours[a]).reduce((x, y) => x + y, 0);
  const most = Math.max(...areas.map(total), 1e-9);
  const row = 34;
  return html`<svg class="chart hours" viewBox=${`0 0 300 ${areas.length * row}`} role="img"
      aria-labelledby="hours-caption" preserveAspectRatio="xMinYMin meet">
    ${areas.map((a, i) => {
      let x = 0;
      return html`<g key=${a} data-area=${a}>
        <text x="0" y=${i * row + 11} class="label">${names[a] || a} · ${duration(total(a))}</text>
        ${CLASSES.concat(Object.keys(hours[a]).filter((c) => !CLASSES.includes(c)))
          .filter((c) => hours[a][c] !== undefined).map((c) => {
            const w = (hours[a][c] / most) * 300;
            const bar = html`<rect x=${x} y=${i * row + 15} width=${w} height="14"
                class=${`bar class-${c}`} data-class=${c} data-hours=${hours[a][c]}>
              <title>${names[a] || a} · ${word("class", c)}: ${duration(hours[a][c])}</title></rect>`;
            x += w;
            return bar;
          })}</g>`;
    })}</svg>`;
}

function DaysChart({ days }) {
  const keys = Object.keys(days);
  const most = Math.max(...Object.values(days), 1);
  const slot = 300 / Math.max(keys.length, 7); // a lone day is not one wall of a bar
  const label = (d) => `${d.slice(8, 10)}/${d.slice(5, 7)}`;
  return html`<svg class="chart days" viewBox="0 0 300 130" role="img"
      aria-labelledby="days-caption">
    ${keys.map((d, i) => {
      const h = (days[d] / most) * 100;
      return html`<g key=${d} data-day=${d}>
        <rect x=${i * slot + slot * 0.15} y=${110 - h} width=${slot * 0.7} height=${h}
              class="bar" data-count=${days[d]}>
          <title>${label(d)}/${d.slice(0, 4)}: ${t("console.reports.bulletins_n", { n: days[d] })}</title>
        </rect>
        <text x=${i * slot + slot / 2} y="126" class="tick">${label(d)}</text></g>`;
    })}</svg>`;
}

function Charts({ summary }) {
  const { hours, names, bulletins_per_day: days } = summary;
  if (!Object.keys(hours).length) return null;
  return html`<div class="charts">
    <figure><figcaption id="hours-caption">${t("console.reports.hours")}</figcaption>
      <${HoursChart} hours=${hours} names=${names} />
      <ul class="legend">${CLASSES.map((c) => html`<li><span class=${`swatch class-${c}`}></span>
        ${word("class", c)}</li>`)}</ul>
      <details><summary>${t("console.reports.table")}</summary>
        <table class="numbers hours"><thead><tr><th scope="col">${t("console.reports.area")}</th>
          <th scope="col">${t("console.reports.class")}</th><th scope="col">${t("console.reports.time")}</th></tr></thead>
          <tbody>${Object.entries(hours).flatMap(([a, cs]) => Object.entries(cs).map(([c, h]) => html`
            <tr><td>${names[a] || a}</td><td>${word("class", c)}</td><td>${duration(h)}</td></tr>`))}
          </tbody></table></details></figure>
    <figure><figcaption id="days-caption">${t("console.reports.per_day")}</figcaption>
      <${DaysChart} days=${days} />
      <details><summary>${t("console.reports.table")}</summary>
        <table class="numbers days"><thead><tr><th scope="col">${t("console.reports.day")}</th>
          <th scope="col">${t("console.reports.count")}</th></tr></thead>
          <tbody>${Object.entries(days).map(([d, n]) => html`<tr>
            <td>${`${d.slice(8, 10)}/${d.slice(5, 7)}/${d.slice(0, 4)}`}</td><td>${n}</td></tr>`)}
          </tbody></table></details></figure></div>`;
}

function AsRun({ entries }) {
  if (!entries.length) return html`<p>${t("console.reports.nothing")}</p>`;
  const cols = [t("console.reports.start"), t("console.reports.end"), t("console.reports.area"),
                t("console.reports.content"), t("console.reports.class"),
                t("console.reports.issuer"), t("console.reports.end_cause")];
  return html`${entries.length > SHOWN_ROWS && html`<p class="note">
      ${t("console.reports.more", { n: SHOWN_ROWS, total: entries.length })}</p>`}
    <table class="asrun"><thead><tr>${cols.map((c) => html`<th scope="col">${c}</th>`)}</tr></thead>
    <tbody>${entries.slice(0, SHOWN_ROWS).map((e) => html`<tr key=${e.broadcast + e.area + e.start}
        data-broadcast=${e.broadcast} data-area=${e.area}>
      <td data-label=${cols[0]}>${dateTime(e.start)}</td>
      <td data-label=${cols[1]}>${e.end ? dateTime(e.end) : t("console.reports.on_air")}</td>
      <td data-label=${cols[2]}>${e.area_name}</td>
      <td data-label=${cols[3]} class="content">${e.title || e.broadcast}</td>
      <td data-label=${cols[4]}>${word("class", e.class)}</td>
      <td data-label=${cols[5]}>${e.issuer || ""}</td>
      <td data-label=${cols[6]}>${e.end_cause || ""}</td></tr>`)}</tbody></table>`;
}

// `area`: the area asked for (#/reports/CODE); the server decides whether the caller may see it.
export function Reports({ area }) {
  const s = session.value;
  const now = Date.now() / 1000;
  const [filters, setFilters] = useState(null); // the query string shown
  const [data, setData] = useState(null); // {entries, summary}
  const [areas, setAreas] = useState(area === s.area.code ? [s.area] : [{ code: area, name: area }, s.area]);
  const [failure, setFailure] = useState("");
  const form = useSubmit(async (f) => setFilters(query(f)));

  const load = async (q) => {
    try {
      const [asrun, summary] = await Promise.all([api("GET", `/api/v1/reports/asrun?${q}`),
                                                  api("GET", `/api/v1/reports/summary?${q}`)]);
      setData({ entries: asrun.entries, summary });
      setFailure("");
    } catch (e) { setFailure(e instanceof ApiFailure ? half(e.message) : t("console.network")); }
  };
  useEffect(() => {
    api("GET", `/api/v1/areas?parent=${encodeURIComponent(s.area.code)}`)
      .then((r) => setAreas((old) => [...old, ...r.areas])).catch(() => {});
  }, []);
  useEffect(() => {
    if (filters === null) {
      const f = new FormData();
      f.set("from", date(now - 6 * DAY)); f.set("to", date(now)); f.set("area", area);
      setFilters(query(f));
      return undefined;
    }
    load(filters);
    let timer = null;
    const soon = () => { clearTimeout(timer); timer = setTimeout(() => load(filters), 1000); };
    const offs = [on("onair", soon), on("resync", () => load(filters))];
    return () => { clearTimeout(timer); offs.forEach((off) => off()); };
  }, [filters]);

  return html`<h1>${t("console.reports")}</h1>
    <form class="report-filters" onSubmit=${form.submit}>
      <${Field} name="from" label=${t("console.reports.from")} defaultValue=${date(now - 6 * DAY)}
                inputmode="numeric" placeholder="dd/mm/yyyy" required failure=${form.failure} />
      <${Field} name="to" label=${t("console.reports.to")} defaultValue=${date(now)}
                inputmode="numeric" placeholder="dd/mm/yyyy" required failure=${form.failure} />
      <label for="report-area">${t("console.reports.area")}</label>
      <select id="report-area" name="area">${areas.map((a) => html`<option value=${a.code}>
        ${a.name}</option>`)}</select>
      <label for="report-class">${t("console.reports.class")}</label>
      <select id="report-class" name="class"><option value="">${t("console.reports.all_classes")}</option>
        ${CLASSES.map((c) => html`<option value=${c}>${word("class", c)}</option>`)}</select>
      <${FormError} failure=${form.failure} />
      <button type="submit" disabled=${form.busy}>${t("console.reports.show")}</button>
    </form>
    ${failure && html`<p class="error" role="alert">${failure}</p>`}
    ${filters && html`<p><a class="csv" href=${`/api/v1/reports/asrun?${filters}&format=csv`}
        download="asrun.csv">${t("console.reports.csv")}</a></p>`}
    ${!data ? html`<p class="loading">${t("console.loading")}</p>` : html`
      <${Charts} summary=${data.summary} />
      <h2>${t("console.reports.asrun")}</h2>
      <${AsRun} entries=${data.entries} />
      <${Availability} area=${area} />`}`;
}
