// Administration of the caller's subtree: users (create, role, emergency right, disable, a new
// password shown once), the area tree with its CSV import (every row checked by a dry run, its
// errors shown, before anything is stored), the audit log (newest first, filtered, paged) and
// who is told of alerts (contacts.js).
// The server decides; a refusal is shown next to the field or the action it concerns.
import { useEffect, useState } from "preact/hooks";
import { html, t, half, word } from "./i18n.js";
import { api, session, ApiFailure } from "./api.js";
import { useSubmit, Field, FormError } from "./forms.js";
import { dateTime } from "./format.js";
import { Contacts } from "./contacts.js";

const ROLES = ["viewer", "editor", "operator", "approver", "admin"];
const tabs = () => [["users", t("console.admin.users")], ["areas", t("console.admin.areas")],
                    ["audit", t("console.admin.audit")], ["alerts", t("console.contacts")]];

function message(e) {
  return e instanceof ApiFailure ? half(e.message) : t("console.network");
}

// The whole subtree once (cached by the server per tree version): names and the area choices.
function useAreas() {
  const [areas, setAreas] = useState(null);
  const reload = () => api("GET", "/api/v1/areas").then((r) => setAreas(r.areas)).catch(() => {});
  useEffect(() => { reload(); }, []);
  return [areas || [], reload];
}

function UserRow({ user, names, mayEmergency, onChange }) {
  const [failure, setFailure] = useState("");
  const [secret, setSecret] = useState("");
  const act = async (fn) => {
    try { await fn(); setFailure(""); onChange(); } catch (e) { setFailure(message(e)); }
  };
  const patch = (body) => act(() => api("PATCH", `/api/v1/users/${user.id}`, body));
  const reset = () => act(async () => {
    setSecret((await api("POST", `/api/v1/users/${user.id}/password`)).password);
  });
  const rights = [user.emergency && word("right", "emergency"), user.direct && word("right", "direct")]
    .filter(Boolean).join(", ");
  const roleId = `role-${user.id}`;
  return html`<li class=${`user ${user.disabled ? "disabled" : ""}`} data-username=${user.username}>
    <div class="who"><strong>${user.username}</strong> · ${names[user.area] || user.area}
      ${user.disabled && html` · <span class="state">${t("console.admin.disabled")}</span>`}
      ${rights && html`<span class="rights"> · ${rights}</span>`}</div>
    <div class="actions">
      <label for=${roleId}>${t("console.role")}</label>
      <select id=${roleId} value=${user.role}
              onChange=${(ev) => patch({ role: ev.target.value })}>
        ${ROLES.map((r) => html`<option value=${r}>${word("role", r)}</option>`)}</select>
      <button type="button" class="disable" onClick=${() => patch({ disabled: !user.disabled })}>
        ${user.disabled ? t("console.admin.enable") : t("console.admin.disable")}</button>
      <button type="button" class="reset" onClick=${reset}>${t("console.admin.reset_password")}</button>
      ${mayEmergency && html`<button type="button" class="emergency"
          onClick=${() => patch({ emergency: !user.emergency })}>
        ${user.emergency ? t("console.admin.revoke_emergency") : t("console.admin.grant_emergency")}</button>`}
    </div>
    ${failure && html`<p class="error" role="alert">${failure}</p>`}
    ${secret && html`<p class="secret" role="status">${t("console.admin.new_password", { user: user.username })}
      <code>${secret}</code></p>`}</li>`;
}

function NewUser({ areas, mayEmergency, onCreated }) {
  const [created, setCreated] = useState(null);
  const form = useSubmit(async (f, el) => {
    const body = { username: f.get("username"), role: f.get("role"), area: f.get("area"),
                   emergency: f.get("emergency") === "on" };
    if (f.get("password")) body.password = f.get("password");
    const user = await api("POST", "/api/v1/users", body);
    setCreated(user);
    el.reset();
    onCreated();
  });
  const wrong = form.failure?.field === "emergency";
  return html`<form class="new-user" onSubmit=${form.submit}>
    <h2>${t("console.admin.new_user")}</h2>
    <${Field} name="username" label=${t("console.username")} autocomplete="off" required
              failure=${form.failure} />
    <label for="new-role">${t("console.role")}</label>
    <select id="new-role" name="role">${ROLES.map((r) => html`<option value=${r}
      defaultSelected=${r === "operator"}>${word("role", r)}</option>`)}</select>
    <${Field} name="area" label=${t("console.area")} list="admin-areas" required
              failure=${form.failure} />
    <datalist id="admin-areas">${areas.map((a) => html`<option value=${a.code}>${a.name}</option>`)}</datalist>
    <${Field} name="password" label=${t("console.admin.password_optional")} type="password"
              autocomplete="new-password" failure=${form.failure} />
    <div class="check">
      <input type="checkbox" id="emergency" name="emergency" disabled=${!mayEmergency}
             aria-invalid=${wrong ? "true" : "false"}
             aria-describedby=${wrong ? "emergency-error" : mayEmergency ? undefined : "emergency-why"} />
      <label for="emergency">${t("console.admin.emergency_right")}</label>
      ${!mayEmergency && html`<p class="why" id="emergency-why">${t("console.admin.emergency_not_yours")}</p>`}
      ${wrong && html`<p class="error" id="emergency-error" role="alert">${form.failure.message}</p>`}
    </div>
    <${FormError} failure=${form.failure} />
    ${form.done && created && html`<p class="ok" role="status">
      ${t("console.admin.created", { user: created.username })}
      ${created.password && html` ${t("console.admin.new_password", { user: created.username })}
        <code>${created.password}</code>`}</p>`}
    <button type="submit" disabled=${form.busy}>${t("console.admin.create")}</button></form>`;
}

function Users() {
  const s = session.value;
  const mayEmergency = s.rights.includes("emergency");
  const [users, setUsers] = useState(null);
  const [failure, setFailure] = useState("");
  const [areas] = useAreas();
  const names = Object.fromEntries(areas.map((a) => [a.code, a.name]));
  const reload = () => api("GET", "/api/v1/users")
    .then((r) => { setUsers(r.users); setFailure(""); }).catch((e) => setFailure(message(e)));
  useEffect(() => { reload(); }, []);
  return html`<${NewUser} areas=${areas} mayEmergency=${mayEmergency} onCreated=${reload} />
    <h2>${t("console.admin.users")}</h2>
    ${failure && html`<p class="error" role="alert">${failure}</p>`}
    ${!users ? html`<p class="loading">${t("console.loading")}</p>` : html`<ul class="users">
      ${users.map((u) => html`<${UserRow} key=${u.id} user=${u} names=${names}
        mayEmergency=${mayEmergency} onChange=${reload} />`)}</ul>`}`;
}

// A CSV body to the import (api() sends JSON only): the same cookie, CSRF value and refusals.
async function sendCsv(text, dryRun) {
  const r = await fetch(`/api/v1/areas/import${dryRun ? "?dry_run=1" : ""}`, {
    method: "POST", credentials: "same-origin", body: text,
    headers: { "Content-Type": "text/csv", "X-CSRF-Token": session.value.csrf } });
  const data = await r.json().catch(() => ({}));
  if (!r.ok && !(dryRun && r.status === 200)) throw Object.assign(new ApiFailure(r.status, data), { data });
  return data;
}

function Problems({ errors, total }) {
  return html`<table class="problems"><caption>${t("console.admin.problems", { n: total })}</caption>
    <thead><tr><th scope="col">${t("console.admin.line")}</th><th scope="col">${t("console.admin.field")}</th>
      <th scope="col">${t("console.admin.error")}</th></tr></thead>
    <tbody>${errors.map((e) => html`<tr data-line=${e.line}><td>${e.line}</td><td>${e.field}</td>
      <td>${half(e.error)}</td></tr>`)}</tbody></table>`;
}

function Import({ onImported }) {
  const [text, setText] = useState("");
  const [check, setCheck] = useState(null); // the dry run's answer
  const [outcome, setOutcome] = useState("");
  const [failure, setFailure] = useState("");
  const pick = async (ev) => {
    const file = ev.target.files[0];
    setCheck(null); setOutcome(""); setFailure("");
    if (!file) return;
    const body = await file.text();
    setText(body);
    try { setCheck(await sendCsv(body, true)); } catch (e) { setFailure(message(e)); }
  };
  const run = async () => {
    try {
      const done = await sendCsv(text, false);
      setOutcome(t("console.admin.imported", { n: done.imported }));
      setCheck(null);
      onImported();
    } catch (e) {
      setFailure(message(e));
      if (e.data?.errors) setCheck({ valid: false, errors: e.data.errors, problems: e.data.problems });
    }
  };
  return html`<section class="import"><h2>${t("console.admin.import")}</h2>
    <p>${t("console.admin.import_help")}</p>
    <label for="csv-file">${t("console.admin.csv_file")}</label>
    <input id="csv-file" type="file" accept=".csv,text/csv" onChange=${pick} />
    ${failure && html`<p class="error" role="alert">${failure}</p>`}
    ${check && !check.valid && html`<${Problems} errors=${check.errors} total=${check.problems} />`}
    ${check && check.valid && html`<p role="status">${t("console.admin.would_import", { n: check.count })}</p>
      <ul class="to-import">${check.rows.map((r) => html`<li>${r.code} · ${r.name} · ${r.parent}</li>`)}</ul>
      <button type="button" class="do-import" onClick=${run}>${t("console.admin.do_import", { n: check.count })}</button>`}
    ${outcome && html`<p class="ok" role="status">${outcome}</p>`}</section>`;
}

function Tree({ code, byCode }) {
  const a = byCode[code];
  if (!a.children.length) return html`<li data-code=${code}>${a.name} <code>${code}</code></li>`;
  return html`<li data-code=${code}><details><summary>${a.name} <code>${code}</code></summary>
    <ul>${a.children.map((c) => byCode[c] && html`<${Tree} key=${c} code=${c} byCode=${byCode} />`)}</ul>
    </details></li>`;
}

function Areas() {
  const [areas, reload] = useAreas();
  const byCode = Object.fromEntries(areas.map((a) => [a.code, a]));
  const root = session.value.area.code;
  return html`<${Import} onImported=${reload} />
    <h2>${t("console.admin.tree")}</h2>
    ${byCode[root] ? html`<ul class="area-tree"><${Tree} code=${root} byCode=${byCode} /></ul>`
                   : html`<p class="loading">${t("console.loading")}</p>`}`;
}

function Audit() {
  const [filters, setFilters] = useState("");
  const [page, setPage] = useState({ entries: [], next: null });
  const [failure, setFailure] = useState("");
  const load = async (q, before) => {
    try {
      const r = await api("GET", `/api/v1/audit?${q}${before ? `&before=${before}` : ""}`);
      setPage((old) => ({ entries: before ? [...old.entries, ...r.entries] : r.entries, next: r.next }));
      setFailure("");
    } catch (e) { setFailure(message(e)); }
  };
  useEffect(() => { load(filters); }, [filters]);
  const form = useSubmit(async (f) => {
    const q = new URLSearchParams();
    for (const k of ["user", "action"]) if (f.get(k)) q.set(k, f.get(k).trim());
    setFilters(q.toString());
  });
  const details = (d) => Object.entries(d || {}).filter(([, v]) => v !== null && v !== undefined)
    .map(([k, v]) => `${k}: ${Array.isArray(v) ? v.join(", ") : v}`).join(" · ");
  return html`<form class="audit-filters" onSubmit=${form.submit}>
      <${Field} name="user" label=${t("console.username")} failure=${form.failure} />
      <${Field} name="action" label=${t("console.admin.action")} list="audit-actions"
                failure=${form.failure} />
      <datalist id="audit-actions">${["user.create", "user.update", "user.password_reset",
        "area.create", "area.update", "area.import", "refused"].map((a) => html`<option value=${a} />`)}</datalist>
      <${FormError} failure=${form.failure} />
      <button type="submit">${t("console.admin.filter")}</button></form>
    ${failure && html`<p class="error" role="alert">${failure}</p>`}
    <ol class="audit">${page.entries.map((e) => html`<li key=${e.seq} data-action=${e.action}>
      <time>${dateTime(e.ts)}</time> <strong>${e.user || "—"}</strong> <code>${e.action}</code>
      ${e.target && html` <span class="target">${e.target}</span>`}
      <span class="details">${details(e.details)}${e.ip ? ` · ${e.ip}` : ""}</span></li>`)}</ol>
    ${!page.entries.length && html`<p>${t("console.admin.no_entries")}</p>`}
    ${page.next && html`<button type="button" class="older" onClick=${() => load(filters, page.next)}>
      ${t("console.admin.older")}</button>`}`;
}

function Alerts() {
  const [areas] = useAreas();
  return html`<${Contacts} areas=${areas} />`;
}

export function Admin({ tab }) {
  const current = ["users", "areas", "audit", "alerts"].includes(tab) ? tab : "users";
  return html`<h1>${t("console.admin")}</h1>
    <nav class="tabs" aria-label=${t("console.admin")}><ul>
      ${tabs().map(([id, name]) => html`<li><a href=${`#/admin/${id}`}
        aria-current=${id === current ? "page" : undefined}>${name}</a></li>`)}</ul></nav>
    ${current === "users" ? html`<${Users} />` : current === "areas" ? html`<${Areas} />`
      : current === "alerts" ? html`<${Alerts} />` : html`<${Audit} />`}`;
}
