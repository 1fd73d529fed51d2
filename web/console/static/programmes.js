// Programmes and approval: write a programme (a file, a playlist, text to speech, a relay, live),
// submit it, and see its status as it changes (the `programme` event reloads the lists). An
// approver has a queue of the pending programmes of their subtree: listen, approve, or reject with
// a reason the author reads.
import { signal } from "@preact/signals";
import { useEffect, useState } from "preact/hooks";
import { html, t, half } from "./i18n.js";
import { api, session, ApiFailure } from "./api.js";
import { useSubmit, Field } from "./forms.js";
import { on } from "./live.js";
import { dateTime } from "./format.js";
import { Listen, length } from "./player.js";
import { loadMedia, invalid, Refusal, Elsewhere } from "./library.js";

const programmes = signal(null); // what concerns the caller, newest first
const queue = signal(null); // pending programmes of the caller's subtree (approvers)
const library = signal([]); // media to choose from and to name playlist items by
const failure = signal("");
const TYPES = ["file", "playlist", "tts", "relay", "live"];
const SHOWN = ["title", "type", "media", "items", "text", "url", "repeat"];

const typeText = () => ({ file: t("console.programmes.type_file"), playlist: t("console.programmes.type_playlist"),
                          tts: t("console.programmes.type_tts"), relay: t("console.programmes.type_relay"),
                          live: t("console.programmes.type_live") });
const statusText = () => ({ draft: t("console.programmes.status_draft"), pending: t("console.programmes.status_pending"),
                            approved: t("console.programmes.status_approved"),
                            rejected: t("console.programmes.status_rejected") });

function refused(e) {
  return e instanceof ApiFailure ? half(e.message) : t("console.network");
}

async function reload() {
  const s = session.value;
  try {
    const [all, pending] = await Promise.all([
      api("GET", "/api/v1/programmes"),
      s.rights.includes("approve")
        ? api("GET", `/api/v1/programmes?status=pending&under=${encodeURIComponent(s.area.code)}`)
        : null]);
    const newest = (a, b) => b.created - a.created;
    programmes.value = all.programmes.sort(newest);
    queue.value = pending && pending.programmes.sort(newest);
    failure.value = "";
  } catch (e) { failure.value = refused(e); }
}

function titleOf(id) {
  return library.value.find((m) => m.id === id)?.title || id;
}

function Content({ p }) {
  if (p.type === "file") return html`<${Listen} id=${p.media} title=${titleOf(p.media)} />`;
  if (p.type === "playlist") {
    return html`<ol class="items">${p.items.map((id) => html`<li key=${id}>
      <span>${titleOf(id)}</span> <${Listen} id=${id} title=${titleOf(id)} /></li>`)}</ol>`;
  }
  if (p.type === "tts") return html`<blockquote class="spoken">${p.text}</blockquote>`;
  if (p.type === "relay") return html`<p class="url">${p.url}</p>`;
  return html`<p class="note">${t("console.programmes.live_note")}</p>`;
}

function Facts({ p }) {
  return html`<span class="meta">${typeText()[p.type] || p.type}
    ${p.duration ? ` · ${length(p.duration)}` : ""}${p.repeat > 1 ? ` · ×${p.repeat}` : ""}
    · ${p.area} · ${p.owner} · ${dateTime(p.created)}</span>`;
}

// ---- writing a programme -------------------------------------------------------------------
function Create() {
  const [type, setType] = useState("file");
  const made = useSubmit(async (f, form) => {
    const body = { title: f.get("title"), type: f.get("type"), repeat: Number(f.get("repeat") || 1) };
    if (body.type === "file") body.media = f.get("media") || undefined;
    if (body.type === "playlist") body.items = f.getAll("items");
    if (body.type === "tts") body.text = f.get("text");
    if (body.type === "relay") body.url = f.get("url");
    await api("POST", "/api/v1/programmes", body);
    form.reset(); setType("file");
    await reload();
  });
  const fail = made.failure;
  const media = library.value;
  return html`<section aria-labelledby="create-title"><h2 id="create-title">${t("console.programmes.create")}</h2>
    <form class="programme" onSubmit=${made.submit} novalidate>
      <${Field} name="title" label=${t("console.programmes.title_field")} maxlength="200" failure=${fail} />
      <label for="type">${t("console.programmes.type")}</label>
      <select ...${invalid("type", fail)} value=${type} onChange=${(ev) => setType(ev.target.value)}>
        ${TYPES.map((x) => html`<option value=${x}>${typeText()[x]}</option>`)}</select>
      <${Refusal} name="type" failure=${fail} />
      ${type === "file" && html`<label for="media">${t("console.programmes.media")}</label>
        <select ...${invalid("media", fail)}>
          <option value="">${t("console.programmes.choose_media")}</option>
          ${media.map((m) => html`<option value=${m.id}>${m.title} (${length(m.duration)})</option>`)}</select>
        <${Refusal} name="media" failure=${fail} />`}
      ${type === "playlist" && html`<fieldset id="items" aria-describedby=${fail?.field === "items" ? "items-error" : undefined}>
          <legend>${t("console.programmes.items")}</legend>
          ${media.length ? media.map((m) => html`<label class="check"><input type="checkbox" name="items" value=${m.id} />
            ${m.title} (${length(m.duration)})</label>`) : html`<p>${t("console.programmes.no_media")}</p>`}
        </fieldset><${Refusal} name="items" failure=${fail} />`}
      ${type === "tts" && html`<label for="text">${t("console.programmes.text")}</label>
        <textarea rows="4" maxlength="5000" ...${invalid("text", fail)}></textarea>
        <${Refusal} name="text" failure=${fail} />`}
      ${type === "relay" && html`<${Field} name="url" type="url" label=${t("console.programmes.url")}
          placeholder="https://…" failure=${fail} />`}
      ${type === "live" && html`<p class="note">${t("console.programmes.live_note")}</p>`}
      <${Field} name="repeat" type="number" min="1" max="10" defaultValue="1"
                label=${t("console.programmes.repeat")} failure=${fail} />
      <${Elsewhere} failure=${fail} shown=${SHOWN} />
      ${made.done && html`<p class="ok" role="status">${t("console.programmes.created")}</p>`}
      <button type="submit" disabled=${made.busy}>${t("console.programmes.save")}</button>
    </form></section>`;
}

// ---- the author's list ---------------------------------------------------------------------
function Mine({ p, mayEdit }) {
  const [problem, setProblem] = useState("");
  const s = session.value;
  const ours = !s.area.path.some((a) => a.code === p.area && a.code !== s.area.code);
  const submit = async () => {
    try { await api("POST", `/api/v1/programmes/${encodeURIComponent(p.id)}/submit`); setProblem(""); await reload(); } catch (e) { setProblem(refused(e)); }
  };
  return html`<li class="programme-row" data-id=${p.id}>
    <div class="what"><strong class="title">${p.title}</strong>
      <span class=${`badge status-${p.status}`}>${statusText()[p.status] || p.status}</span>
      <${Facts} p=${p} /></div>
    ${p.status === "rejected" && p.reason && html`<p class="reason">
      ${t("console.programmes.rejected_because", { who: p.rejected_by || "" })} <q>${p.reason}</q></p>`}
    ${p.status === "approved" && html`<p class="approved">${t("console.programmes.approved_by", {
        who: p.approved_by || "", when: dateTime(p.approved_at) })}</p>`}
    <div class="actions"><${Content} p=${p} />
      ${mayEdit && ours && (p.status === "draft" || p.status === "rejected") && html`
        <button type="button" class="submit" onClick=${submit}
          aria-label=${t("console.programmes.submit_item", { title: p.title })}>${t("console.programmes.submit")}</button>`}</div>
    ${problem && html`<p class="error" role="alert">${problem}</p>`}</li>`;
}

// ---- the approver's queue ------------------------------------------------------------------
function Pending({ p }) {
  const id = `reason-${p.id}`;
  const approve = useSubmit(async () => {
    await api("POST", `/api/v1/programmes/${encodeURIComponent(p.id)}/approve`);
    await reload();
  });
  const reject = useSubmit(async (f) => {
    await api("POST", `/api/v1/programmes/${encodeURIComponent(p.id)}/reject`, { reason: f.get("reason") });
    await reload();
  });
  return html`<li class="pending" data-id=${p.id}>
    <div class="what"><strong class="title">${p.title}</strong><${Facts} p=${p} />
      ${p.submitted_by && html`<span class="meta">${t("console.programmes.submitted_by", { who: p.submitted_by })}</span>`}</div>
    <${Content} p=${p} />
    <form class="approve" onSubmit=${approve.submit}>
      <${Elsewhere} failure=${approve.failure} shown=${[]} />
      <button type="submit" disabled=${approve.busy}
        aria-label=${t("console.programmes.approve_item", { title: p.title })}>${t("console.programmes.approve")}</button>
    </form>
    <form class="reject" onSubmit=${reject.submit}>
      <label for=${id}>${t("console.programmes.reason")}</label>
      <textarea rows="2" maxlength="1000" ...${invalid("reason", reject.failure, id)}></textarea>
      <${Refusal} name="reason" id=${id} failure=${reject.failure} />
      <${Elsewhere} failure=${reject.failure} shown=${["reason"]} />
      <button type="submit" class="reject" disabled=${reject.busy}
        aria-label=${t("console.programmes.reject_item", { title: p.title })}>${t("console.programmes.reject")}</button>
    </form></li>`;
}

function Queue() {
  const items = queue.value;
  return html`<section class="queue" aria-labelledby="queue-title">
    <h2 id="queue-title">${t("console.programmes.queue")}</h2>
    ${!items ? html`<p class="loading">${t("console.loading")}</p>`
      : items.length ? html`<ul class="queue-list">${items.map((p) => html`<${Pending} key=${p.id} p=${p} />`)}</ul>`
      : html`<p>${t("console.programmes.queue_empty")}</p>`}</section>`;
}

export function Programmes() {
  const s = session.value;
  const mayEdit = s.rights.includes("edit");
  useEffect(() => {
    reload();
    loadMedia().then((items) => { library.value = items; });
    const offs = [on("programme", reload), on("resync", reload)];
    return () => offs.forEach((off) => off());
  }, []);
  const items = programmes.value;
  return html`<h1>${t("console.programmes")}</h1>
    ${failure.value && html`<p class="error" role="alert">${failure.value}</p>`}
    ${s.rights.includes("approve") && html`<${Queue} />`}
    ${mayEdit ? html`<${Create} />` : html`<p class="note read-only">${t("console.programmes.read_only")}</p>`}
    <section aria-labelledby="list-title"><h2 id="list-title">${t("console.programmes.list")}</h2>
      ${!items ? html`<p class="loading">${t("console.loading")}</p>`
        : items.length ? html`<ul class="programme-list">${items.map((p) => html`<${Mine} key=${p.id} p=${p} mayEdit=${mayEdit} />`)}</ul>`
        : html`<p>${t("console.programmes.none")}</p>`}</section>`;
}
