// Availability of the loudspeakers for a month (the reports screen's last section): per area of
// the subtree that has devices, the share of the month they were online, hours in fault and
// offline, outages; and the API's own CSV and XLSX for the same area and month as plain links
// (the session cookie authenticates them).
import { useEffect, useState } from "preact/hooks";
import { html, t, half } from "./i18n.js";
import { api, ApiFailure } from "./api.js";

// The last 12 local months, newest first, as "YYYY-MM".
function months() {
  const out = [];
  const d = new Date();
  for (let i = 0; i < 12; i += 1) {
    const m = new Date(d.getFullYear(), d.getMonth() - i, 1);
    out.push(`${m.getFullYear()}-${String(m.getMonth() + 1).padStart(2, "0")}`);
  }
  return out;
}

const hours = (s) => (s / 3600).toFixed(1);

export function Availability({ area }) {
  const choices = months();
  const [month, setMonth] = useState(choices[0]);
  const [data, setData] = useState(null);
  const [failure, setFailure] = useState("");
  const q = new URLSearchParams({ area, month }).toString();
  useEffect(() => {
    setData(null);
    api("GET", `/api/v1/reports/availability?${q}`).then((r) => { setData(r); setFailure(""); })
      .catch((e) => setFailure(e instanceof ApiFailure ? half(e.message) : t("console.network")));
  }, [q]);
  const link = (path, fmt, extra = "") => `/api/v1/reports/${path}?${q}&format=${fmt}${extra}`;
  return html`<section class="availability" aria-labelledby="availability-title">
    <h2 id="availability-title">${t("console.availability")}</h2>
    <label for="availability-month">${t("console.availability.month")}</label>
    <select id="availability-month" value=${month} onChange=${(e) => setMonth(e.target.value)}>
      ${choices.map((m) => html`<option value=${m}>${m.slice(5)}/${m.slice(0, 4)}</option>`)}
    </select>
    <p class="downloads">
      <a class="availability-csv" href=${link("availability", "csv")} download>${t("console.availability.csv")}</a>
      ${" · "}<a class="availability-csv-devices" href=${link("availability", "csv", "&by=device")} download>
        ${t("console.availability.csv_devices")}</a>
      ${" · "}<a class="availability-xlsx" href=${link("availability", "xlsx")} download>
        ${t("console.availability.xlsx")}</a>
      ${" · "}<a class="availability-condition" href=${link("condition", "xlsx")} download>
        ${t("console.availability.condition")}</a></p>
    ${failure && html`<p class="error" role="alert">${failure}</p>`}
    ${!data ? !failure && html`<p class="loading">${t("console.loading")}</p>`
      : !data.areas.length ? html`<p>${t("console.availability.nothing")}</p>` : html`
      <table class="numbers availability"><thead><tr>
        <th scope="col">${t("console.reports.area")}</th>
        <th scope="col">${t("console.availability.devices")}</th>
        <th scope="col">${t("console.availability.share")}</th>
        <th scope="col">${t("console.availability.fault_h")}</th>
        <th scope="col">${t("console.availability.offline_h")}</th>
        <th scope="col">${t("console.availability.outages")}</th></tr></thead>
        <tbody>${data.areas.map((r) => html`<tr key=${r.area} data-area=${r.area}>
          <td>${r.name}</td><td>${r.devices}</td>
          <td class="share">${r.availability_pct === null ? "–" : `${r.availability_pct} %`}</td>
          <td>${hours(r.fault_s)}</td><td>${hours(r.offline_s)}</td><td>${r.outages}</td>
        </tr>`)}</tbody></table>`}</section>`;
}
