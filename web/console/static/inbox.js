// The bulletin inbox (TT 39): bulletins from the levels above waiting for the commune. A normal
// one is listened to, then scheduled (date dd/mm/yyyy, time HH:MM[:SS]) or declined with a
// reason the sender reads; a priority one is ordered against the commune's own ("before": the
// level's, "after": the commune's own first); an emergency needs no one. A level that sends
// bulletins sees, per bulletin, what each commune did. Live through the `inbox` event.
import { signal } from "@preact/signals";
import { useEffect, useState } from "preact/hooks";
import { html, t, half, word } from "./i18n.js";
import { api, session, ApiFailure } from "./api.js";
import { useSubmit, Field, FormError } from "./forms.js";
import { on } from "./live.js";
import { dateTime, isoDay } from "./format.js";
import { Listen } from "./player.js";

const entries = signal(null); // the caller's inbox, newest first
const sent = signal(null); // bulletins the caller's level sent, with their communes' answers
const failure = signal("");

const stateText = () => ({ pending: t("console.inbox.pending"), scheduled: t("console.inbox.scheduled"),
                           declined: t("console.inbox.declined"), aired: t("console.inbox.aired"),
                           cancelled: t("console.inbox.cancelled") });

async function reload() {
  try {
    const [box, out] = await Promise.all([api("GET", "/api/v1/inbox"), api("GET", "/api/v1/bulletins")]);
    entries.value = box.entries;
    const newest = out.bulletins.sort((a, b) => b.created - a.created).slice(0, 20);
    sent.value = await Promise.all(newest.map(
      (b) => api("GET", `/api/v1/bulletins/${encodeURIComponent(b.id)}`)));
    failure.value = "";
  } catch (e) { failure.value = e instanceof ApiFailure ? half(e.message) : t("console.network"); }
}

// Events come in bursts (a bulletin to a whole district is one per commune): one reload each.
let pending = null;
function reloadSoon() {
  clearTimeout(pending);
  pending = setTimeout(reload, 200);
}

const path = (e, action) => `/api/v1/inbox/${encodeURIComponent(e.id)}/${action}`;

function Content({ e }) {
  if (e.text) return html`<blockquote class="spoken">${e.text}</blockquote>`;
  return html`${e.listen.map((id, i) => html`<${Listen} key=${id} id=${id}
    title=${e.listen.length > 1 ? `${e.title} (${i + 1})` : e.title} />`)}`;
}

function ScheduleIt({ e }) {
  const [conflicts, setConflicts] = useState([]);
  const done = useSubmit(async (_f, form) => {
    const f = plain(form, e);
    const day = f.get("date").trim();
    const out = await api("POST", path(e, "schedule"), {
      date: day ? (isoDay(day) ?? day) : undefined, time: f.get("time").trim() });
    setConflicts(out.conflicts || []);
    await reload();
  });
  const id = (name) => `${name}-${e.id}`;
  const fail = done.failure && { ...done.failure, field: done.failure.field && id(done.failure.field) };
  return html`<form class="inbox-schedule" onSubmit=${done.submit} novalidate>
    <${Field} name=${id("date")} label=${t("console.inbox.date")} type="text" inputmode="numeric"
      autocomplete="off" placeholder="dd/mm/yyyy" failure=${fail} />
    <${Field} name=${id("time")} label=${t("console.inbox.time")} type="text" inputmode="numeric"
      autocomplete="off" placeholder="HH:MM" failure=${fail} />
    <${FormError} failure=${done.failure} />
    ${conflicts.length > 0 && html`<p class="note">${t("console.inbox.conflicts", { n: conflicts.length })}</p>`}
    <button type="submit" disabled=${done.busy}
      aria-label=${t("console.inbox.schedule_item", { title: e.title })}>${t("console.inbox.schedule")}</button>
  </form>`;
}

// The form's fields are named date-ID / time-ID: FormData reads them under their plain names.
function plain(form, e) {
  const f = new FormData(form);
  for (const name of ["date", "time", "reason"]) {
    if (f.has(`${name}-${e.id}`)) f.set(name, f.get(`${name}-${e.id}`));
  }
  return f;
}

function DeclineIt({ e }) {
  const done = useSubmit(async (_f, form) => {
    await api("POST", path(e, "decline"), { reason: plain(form, e).get("reason") });
    await reload();
  });
  const id = `reason-${e.id}`;
  const wrong = done.failure && done.failure.field === "reason";
  return html`<form class="inbox-decline" onSubmit=${done.submit} novalidate>
    <label for=${id}>${t("console.inbox.reason")}</label>
    <textarea id=${id} name=${id} rows="2" maxlength="500" aria-invalid=${wrong ? "true" : "false"}
      aria-describedby=${wrong ? `${id}-error` : undefined}></textarea>
    ${wrong && html`<p class="error" id=${`${id}-error`} role="alert">${done.failure.message}</p>`}
    <${FormError} failure=${done.failure} />
    <button type="submit" class="decline" disabled=${done.busy}
      aria-label=${t("console.inbox.decline_item", { title: e.title })}>${t("console.inbox.decline")}</button>
  </form>`;
}

function OrderIt({ e }) {
  const [problem, setProblem] = useState("");
  const choose = async (order) => {
    try { await api("POST", path(e, "order"), { order }); setProblem(""); await reload(); }
    catch (err) { setProblem(err instanceof ApiFailure ? half(err.message) : t("console.network")); }
  };
  const name = `order-${e.id}`;
  return html`<fieldset class="inbox-order"><legend>${t("console.inbox.order")}</legend>
    ${["before", "after"].map((o) => html`<label class="check"><input type="radio" name=${name}
      value=${o} checked=${e.order === o} onChange=${() => choose(o)} />
      ${o === "before" ? t("console.inbox.before") : t("console.inbox.after")}</label>`)}
    ${problem && html`<p class="error" role="alert">${problem}</p>`}</fieldset>`;
}

function Entry({ e }) {
  const may = session.value.rights.includes("air") && !e.node; // a child node's commune acts there
  return html`<li class=${`inbox-entry class-${e.class}`} data-id=${e.id} data-area=${e.area}>
    <div class="what"><strong class="title">${e.title}</strong>
      <span class=${`badge state-${e.state}`}>${stateText()[e.state] || e.state}</span>
      <span class="meta">${[word("class", e.class), t("console.inbox.from", { from: e.from_name || e.from }),
                            e.area !== session.value.area.code ? e.area_name : null,
                            dateTime(e.created)].filter(Boolean).join(" · ")}</span></div>
    ${e.state === "declined" && e.reason && html`<p class="reason">${t("console.inbox.declined_because")} <q>${e.reason}</q></p>`}
    <div class="actions"><${Content} e=${e} /></div>
    ${may && e.class === "normal" && e.state === "pending" && html`<div class="decide">
      <${ScheduleIt} e=${e} /><${DeclineIt} e=${e} /></div>`}
    ${may && e.class === "priority" && html`<${OrderIt} e=${e} />`}
    ${e.class === "emergency" && html`<p class="note">${t("console.inbox.emergency_note")}</p>`}
  </li>`;
}

function Sent({ b }) {
  return html`<li class="sent-bulletin" data-id=${b.id}>
    <div class="what"><strong class="title">${b.title}</strong>
      <span class="meta">${word("class", b.class)} · ${dateTime(b.created)}</span></div>
    <table class="communes"><caption>${t("console.inbox.communes", { title: b.title })}</caption>
      <thead><tr><th scope="col">${t("console.inbox.commune")}</th><th scope="col">${t("console.inbox.state")}</th>
        <th scope="col">${t("console.inbox.detail")}</th></tr></thead>
      <tbody>${b.entries.map((e) => html`<tr data-area=${e.area}>
        <th scope="row">${e.area_name || e.area}</th>
        <td class=${`state-${e.state}`}>${stateText()[e.state] || e.state}</td>
        <td>${e.node && !e.received ? t("console.inbox.not_at_node", { node: e.node })
          : e.state === "declined" ? e.reason : e.class === "priority"
          ? (e.order === "after" ? t("console.inbox.after") : t("console.inbox.before")) : ""}</td></tr>`)}
      </tbody></table></li>`;
}

export function Inbox() {
  useEffect(() => {
    reload();
    const offs = [on("inbox", reloadSoon), on("resync", reload)];
    return () => offs.forEach((off) => off());
  }, []);
  const own = session.value.area.code; // a level's own bulletins are under "sent", not here
  const waiting = (e) => (e.state === "pending" ? 0 : 1); // what needs the commune first
  const box = entries.value && entries.value.filter((e) => e.from !== own)
    .sort((a, b) => waiting(a) - waiting(b) || b.created - a.created);
  const mine = sent.value;
  return html`<h1>${t("console.inbox")}</h1>
    ${failure.value && html`<p class="error" role="alert">${failure.value}</p>`}
    <section aria-labelledby="inbox-title"><h2 id="inbox-title">${t("console.inbox.received")}</h2>
      ${!session.value.rights.includes("air") && html`<p class="note read-only">${t("console.inbox.read_only")}</p>`}
      ${!box ? html`<p class="loading">${t("console.loading")}</p>`
        : box.length ? html`<ul class="inbox-list">${box.map((e) => html`<${Entry} key=${e.id} e=${e} />`)}</ul>`
        : html`<p>${t("console.inbox.empty")}</p>`}</section>
    ${mine && mine.length > 0 && html`<section aria-labelledby="sent-title">
      <h2 id="sent-title">${t("console.inbox.sent")}</h2>
      <ul class="sent-list">${mine.map((b) => html`<${Sent} key=${b.id} b=${b} />`)}</ul></section>`}`;
}
