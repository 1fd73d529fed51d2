// Library: the media of the caller's area, its subtree and what the areas above hand down.
// Upload (drag and drop or pick, several files, a progress bar and the server's answer per file),
// record from the microphone, text to speech with a preview, listen, search, filter, delete.
// Uploads go through XMLHttpRequest: fetch reports no upload progress.
import { signal } from "@preact/signals";
import { useEffect, useState } from "preact/hooks";
import { html, t, half } from "./i18n.js";
import { api, session, ApiFailure } from "./api.js";
import { useSubmit } from "./forms.js";
import { on } from "./live.js";
import { dateTime } from "./format.js";
import { Listen, length } from "./player.js";

const media = signal(null); // [records] newest first, or null before the first load
const failure = signal("");
const uploads = signal([]); // [{key, name, sent, state: sending|decoding|done|refused, message}]
const query = signal("");
const kind = signal("all"); // all | here | above | tts

export async function loadMedia() {
  try {
    const data = await api("GET", "/api/v1/media");
    media.value = data.media.sort((a, b) => b.created - a.created);
    failure.value = "";
  } catch (e) { failure.value = e instanceof ApiFailure ? half(e.message) : t("console.network"); }
  return media.value || [];
}

// ---- uploads -------------------------------------------------------------------------------
let counter = 0;

function track(key, changes) {
  uploads.value = uploads.value.map((u) => (u.key === key ? { ...u, ...changes } : u));
}

function send(file, title) {
  const key = ++counter;
  uploads.value = [{ key, name: file.name, sent: 0, state: "sending", message: "" }, ...uploads.value];
  const form = new FormData();
  form.append("title", title);
  form.append("file", file, file.name);
  const xhr = new XMLHttpRequest();
  xhr.open("POST", "/api/v1/media");
  xhr.setRequestHeader("X-CSRF-Token", session.value?.csrf || "");
  xhr.upload.onprogress = (ev) => { if (ev.lengthComputable) track(key, { sent: ev.loaded / ev.total }); };
  xhr.upload.onload = () => track(key, { sent: 1, state: "decoding" }); // the node decodes now
  xhr.onload = () => {
    if (xhr.status === 201) { track(key, { sent: 1, state: "done" }); loadMedia(); return; }
    if (xhr.status === 401) session.value = null;
    let body = {};
    try { body = JSON.parse(xhr.responseText); } catch { /* not JSON: a proxy's page */ }
    track(key, { state: "refused", message: half(body.error || String(xhr.status)) });
  };
  xhr.onerror = () => track(key, { state: "refused", message: t("console.network") });
  xhr.send(form);
}

function sendAll(files) {
  for (const f of files) send(f, f.name.replace(/\.[^.]+$/, ""));
}

const stateText = () => ({ sending: t("console.library.sending"), decoding: t("console.library.decoding"),
                           done: t("console.library.done"), refused: t("console.library.refused") });

function Uploads() {
  if (!uploads.value.length) return null;
  return html`<ul class="uploads" aria-live="polite">${uploads.value.map((u) => html`
    <li key=${u.key} class=${`upload ${u.state}`}>
      <span class="name">${u.name}</span>
      <progress max="1" value=${u.sent} aria-label=${t("console.library.progress", { name: u.name })}></progress>
      <span class="state">${stateText()[u.state]}</span>
      ${u.state === "refused" && html`<p class="error" role="alert">${u.message}</p>`}
    </li>`)}</ul>`;
}

function Upload() {
  const [over, setOver] = useState(false);
  const drop = (ev) => { ev.preventDefault(); setOver(false); sendAll(ev.dataTransfer.files); };
  const drag = (ev) => { ev.preventDefault(); setOver(true); };
  return html`<section class="upload-box" aria-labelledby="upload-title">
    <h2 id="upload-title">${t("console.library.upload")}</h2>
    <div class=${`dropzone${over ? " over" : ""}`} onDragOver=${drag} onDragEnter=${drag}
         onDragLeave=${() => setOver(false)} onDrop=${drop}>
      <p>${t("console.library.drop_here")}</p>
      <label for="media-files">${t("console.library.choose_files")}</label>
      <input id="media-files" type="file" multiple accept="audio/*,video/*,.wav,.mp3,.ogg,.opus,.m4a,.aac,.flac,.amr,.webm"
             onChange=${(ev) => { sendAll(ev.target.files); ev.target.value = ""; }} />
    </div>
    <${Uploads} /></section>`;
}

// ---- microphone ----------------------------------------------------------------------------
const recorder = signal(null); // the MediaRecorder while recording
const elapsed = signal(0); // seconds recorded so far, shown while recording

async function record(setProblem) {
  if (!navigator.mediaDevices?.getUserMedia || !window.MediaRecorder) {
    setProblem(t("console.library.no_microphone")); return;
  }
  let stream;
  try { stream = await navigator.mediaDevices.getUserMedia({ audio: true }); } catch {
    setProblem(t("console.library.microphone_refused")); return;
  }
  setProblem("");
  const rec = new MediaRecorder(stream); // webm/opus in Chromium and Firefox: FFmpeg decodes it
  const parts = [];
  const started = Date.now() / 1000;
  rec.ondataavailable = (ev) => parts.push(ev.data);
  const clock = setInterval(() => { elapsed.value = Date.now() / 1000 - started; }, 1000);
  rec.onstop = () => {
    clearInterval(clock);
    stream.getTracks().forEach((track) => track.stop());
    recorder.value = null;
    const type = rec.mimeType || "audio/webm";
    const ext = type.includes("ogg") ? "ogg" : type.includes("mp4") ? "m4a" : "webm";
    const title = t("console.library.recording_title", { when: dateTime(started) });
    send(new File(parts, `${title.replace(/[^\p{L}\p{N}]+/gu, "-")}.${ext}`, { type }), title);
  };
  rec.start();
  elapsed.value = 0;
  recorder.value = rec;
}

function Recorder() {
  const [problem, setProblem] = useState("");
  const rec = recorder.value;
  return html`<section aria-labelledby="record-title">
    <h2 id="record-title">${t("console.library.record")}</h2>
    ${rec ? html`<p class="recording" role="status">${t("console.library.recording")} <time>${length(elapsed.value)}</time></p>
        <button type="button" class="stop" onClick=${() => rec.stop()}>${t("console.library.stop_and_upload")}</button>`
      : html`<button type="button" class="record" onClick=${() => record(setProblem)}>${t("console.library.start_recording")}</button>`}
    ${problem && html`<p class="error" role="alert">${problem}</p>`}</section>`;
}

// ---- text to speech ------------------------------------------------------------------------
// A control other than <input> (Field covers those) with the API's refusal under it; `id` when
// the same field name appears more than once on the screen.
export function invalid(name, failure, id = name) {
  const wrong = failure && failure.field === name;
  return { id, name, "aria-invalid": wrong ? "true" : "false",
           "aria-describedby": wrong ? `${id}-error` : undefined };
}

export function Refusal({ name, failure, id = name }) {
  return failure && failure.field === name
    ? html`<p class="error" id=${`${id}-error`} role="alert">${failure.message}</p>` : null;
}

// The refusal of a field this form does not show (or of none) goes above the submit button.
export function Elsewhere({ failure, shown }) {
  return failure && !shown.includes(failure.field)
    ? html`<p class="error" role="alert">${failure.message}</p>` : null;
}

function Speech() {
  const [made, setMade] = useState(null);
  const tts = useSubmit(async (f) => {
    setMade(null);
    setMade(await api("POST", "/api/v1/tts", { text: f.get("text") }));
    loadMedia();
  });
  return html`<section aria-labelledby="tts-title">
    <h2 id="tts-title">${t("console.library.tts")}</h2>
    <form class="tts" onSubmit=${tts.submit}>
      <label for="text">${t("console.library.tts_text")}</label>
      <textarea rows="3" maxlength="5000" ...${invalid("text", tts.failure)}></textarea>
      <${Refusal} name="text" failure=${tts.failure} />
      <${Elsewhere} failure=${tts.failure} shown=${["text"]} />
      <button type="submit" disabled=${tts.busy}>${tts.busy ? t("console.library.tts_making") : t("console.library.tts_make")}</button>
    </form>
    ${made && html`<div class="preview" role="status"><p>${t("console.library.tts_saved", { title: made.title })}</p>
      <${Listen} key=${made.id} id=${made.id} title=${made.title} open=${true} /></div>`}</section>`;
}

// ---- the list ------------------------------------------------------------------------------
// Lower case without diacritics: "ban tin" finds "Bản tin".
function plain(text) {
  return String(text || "").normalize("NFD").replace(/\p{M}/gu, "").replace(/đ/gi, "d").toLowerCase();
}

function above(m) {
  const s = session.value;
  return m.area !== s.area.code && s.area.path.some((a) => a.code === m.area);
}

const KINDS = { all: () => true, here: (m) => !above(m), above, tts: (m) => Boolean(m.tts) };

function shown(items) {
  const q = plain(query.value.trim());
  const fits = KINDS[kind.value] || KINDS.all;
  return items.filter((m) => fits(m) && (!q || plain(`${m.title} ${m.filename} ${m.owner}`).includes(q)));
}

function Item({ m, mayEdit }) {
  const [asking, setAsking] = useState(false);
  const [problem, setProblem] = useState("");
  const remove = async () => {
    try { await api("DELETE", `/api/v1/media/${encodeURIComponent(m.id)}`); setProblem(""); loadMedia(); } catch (e) {
      setAsking(false);
      setProblem(e instanceof ApiFailure ? half(e.message) : t("console.network"));
    }
  };
  const handed = above(m);
  return html`<li class="media" data-id=${m.id}>
    <div class="what"><strong class="title">${m.title}</strong>
      <span class="meta">${length(m.duration)} · ${dateTime(m.created)} · ${m.owner} · ${m.area}
        ${m.tts ? ` · ${t("console.library.from_tts")}` : ""}</span></div>
    <div class="actions"><${Listen} id=${m.id} title=${m.title} />
      ${mayEdit && !handed && !asking && html`<button type="button" class="delete"
          aria-label=${t("console.library.delete_item", { title: m.title })} onClick=${() => setAsking(true)}>${t("console.library.delete")}</button>`}
      ${mayEdit && !handed && asking && html`<span class="confirm">${t("console.library.delete_sure")}
          <button type="button" class="delete yes" onClick=${remove}>${t("console.library.delete_yes")}</button>
          <button type="button" onClick=${() => setAsking(false)}>${t("console.library.delete_no")}</button></span>`}
      ${handed && html`<span class="note">${t("console.library.handed_down")}</span>`}</div>
    ${problem && html`<p class="error" role="alert">${problem}</p>`}</li>`;
}

function List({ mayEdit }) {
  const items = media.value;
  if (!items) return html`<p class="loading">${t("console.loading")}</p>`;
  const found = shown(items);
  return html`<div class="filters">
      <label for="media-search">${t("console.library.search")}</label>
      <input id="media-search" type="search" value=${query.value}
             onInput=${(ev) => { query.value = ev.target.value; }} />
      <label for="media-kind">${t("console.library.filter")}</label>
      <select id="media-kind" value=${kind.value} onChange=${(ev) => { kind.value = ev.target.value; }}>
        <option value="all">${t("console.library.filter_all")}</option>
        <option value="here">${t("console.library.filter_here")}</option>
        <option value="above">${t("console.library.filter_above")}</option>
        <option value="tts">${t("console.library.filter_tts")}</option>
      </select></div>
    <p class="count" role="status">${t("console.library.count", { n: found.length, total: items.length })}</p>
    <ul class="media-list">${found.map((m) => html`<${Item} key=${m.id} m=${m} mayEdit=${mayEdit} />`)}</ul>`;
}

export function Library() {
  const mayEdit = session.value.rights.includes("edit");
  useEffect(() => {
    loadMedia();
    return on("resync", loadMedia);
  }, []);
  return html`<h1>${t("console.library")}</h1>
    ${failure.value && html`<p class="error" role="alert">${failure.value}</p>`}
    ${mayEdit ? html`<div class="library-tools"><${Upload} /><${Recorder} /><${Speech} /></div>`
              : html`<p class="note read-only">${t("console.library.read_only")}</p>`}
    <h2>${t("console.library.items")}</h2>
    <${List} mayEdit=${mayEdit} />`;
}
