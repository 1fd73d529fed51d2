// Boards: compose what LED/LCD boards show (docs/device-protocol.md 3.4.1: text, ticker, images
// and video by URL, full or split layout, validity, weekdays and a daily time window per item),
// preview it, send it to one board or to every board of the area. The preview is the board page
// itself (/board?preview, framed): the same renderer and rules as on the boards, and images and
// videos load from their URLs under the board page's own policy, never into the console's.
import { signal } from "@preact/signals";
import { useEffect, useRef, useState } from "preact/hooks";
import { html, t, half } from "./i18n.js";
import { api, session, ApiFailure } from "./api.js";
import { on } from "./live.js";
import { useSubmit } from "./forms.js";
import { Outcome, acked, sendOne } from "./devices.js";

const draft = signal({ layout: "full", ticker: "", items: [] });
const boards = signal([]);
const target = signal(""); // a board's id, or "" for every board of the caller's area
const DAYS = [1, 2, 3, 4, 5, 6, 7];
const OFFSET = "+07:00"; // Asia/Ho_Chi_Minh, no daylight saving: what operators type

const epoch = (local) => (local ? Date.parse(`${local}:00${OFFSET}`) / 1000 : undefined);
const local = (e) => (e ? new Date((e + 7 * 3600) * 1000).toISOString().slice(0, 16) : "");

function dayWord(d) {
  return [t("console.boards.mon"), t("console.boards.tue"), t("console.boards.wed"), t("console.boards.thu"),
          t("console.boards.fri"), t("console.boards.sat"), t("console.boards.sun")][d - 1];
}

// The display command's args for a draft (and back, from a board's display state).
export function displayArgs(d) {
  const items = d.items.map((it) => {
    const out = { type: it.type };
    if (it.type === "text") Object.assign(out, { text: it.text, ...(it.title && { title: it.title }),
                                                 ...(it.scroll && { scroll: true }) });
    else out.url = it.url;
    if (d.layout === "split") out.region = it.region;
    if (it.from) out.valid_from = epoch(it.from);
    if (it.to) out.valid_to = epoch(it.to);
    if (it.days.length && it.days.length < 7) out.weekdays = it.days;
    if (it.start && it.end) out.times = [[it.start, it.end]];
    if (it.duration) out.duration_s = Number(it.duration);
    return out;
  });
  return { layout: d.layout, ...(d.ticker && { ticker: d.ticker }), ...(items.length && { items }) };
}

function fromState(s) {
  if (!s) return { layout: "full", ticker: "", items: [] };
  return { layout: s.layout, ticker: s.ticker || "", items: s.items.map((it) => ({
    type: it.type, text: it.text || "", title: it.title || "", scroll: !!it.scroll, url: it.url || "",
    region: it.region || "main", from: local(it.valid_from), to: local(it.valid_to),
    days: it.weekdays || [...DAYS], start: it.times?.[0]?.[0] || "", end: it.times?.[0]?.[1] || "",
    duration: it.duration_s || "" })) };
}

const blank = (type) => ({ type, text: "", title: "", scroll: false, url: "", region: "main",
                           from: "", to: "", days: [...DAYS], start: "", end: "", duration: "" });

function change(i, k, v) {
  const items = draft.value.items.map((it, j) => (j === i ? { ...it, [k]: v } : it));
  draft.value = { ...draft.value, items };
}

function Item({ it, i }) {
  const id = (k) => `item-${i}-${k}`;
  const input = (k, label, extra = {}) => html`<label for=${id(k)}>${label}</label>
    <input id=${id(k)} value=${it[k]} onInput=${(e) => change(i, k, e.target.value)} ...${extra} />`;
  const days = (d, on) => change(i, "days", on ? [...it.days, d].sort() : it.days.filter((x) => x !== d));
  const kind = { text: t("console.boards.text"), image: t("console.boards.image"), video: t("console.boards.video") };
  return html`<fieldset class="board-item" data-type=${it.type}>
    <legend>${t("console.boards.item", { n: i + 1, kind: kind[it.type] })}</legend>
    ${it.type === "text" ? html`${input("title", t("console.boards.headline"), { maxlength: 200 })}
        <label for=${id("text")}>${t("console.boards.text")}</label>
        <textarea id=${id("text")} maxlength="2000" required rows="3" value=${it.text}
                  onInput=${(e) => change(i, "text", e.target.value)}></textarea>
        <label class="check"><input type="checkbox" checked=${it.scroll}
          onChange=${(e) => change(i, "scroll", e.target.checked)} /> ${t("console.boards.scroll")}</label>`
      : input("url", t("console.boards.url"), { type: "url", required: true, maxlength: 2000 })}
    ${draft.value.layout === "split" && html`<label for=${id("region")}>${t("console.boards.region")}</label>
      <select id=${id("region")} value=${it.region} onChange=${(e) => change(i, "region", e.target.value)}>
        <option value="main">${t("console.boards.main")}</option>
        <option value="side">${t("console.boards.side")}</option></select>`}
    <div class="when">
      <div>${input("from", t("console.boards.from"), { type: "datetime-local" })}</div>
      <div>${input("to", t("console.boards.to"), { type: "datetime-local" })}</div>
      <div>${input("start", t("console.boards.start"), { type: "time" })}</div>
      <div>${input("end", t("console.boards.end"), { type: "time" })}</div>
      <div>${input("duration", t("console.boards.duration"), { type: "number", min: 1, max: 86400 })}</div>
    </div>
    <fieldset class="days"><legend>${t("console.boards.weekdays")}</legend>
      ${DAYS.map((d) => html`<label class="check"><input type="checkbox" name=${id("day")} value=${d}
          checked=${it.days.includes(d)} onChange=${(e) => days(d, e.target.checked)} /> ${dayWord(d)}</label>`)}
    </fieldset>
    <button type="button" class="remove" onClick=${() => {
      draft.value = { ...draft.value, items: draft.value.items.filter((_, j) => j !== i) }; }}>
      ${t("console.boards.remove", { n: i + 1 })}</button>
  </fieldset>`;
}

function Preview({ size }) {
  const frame = useRef(null);
  const show = () => frame.current?.contentWindow?.loaBoard?.preview?.(displayArgs(draft.value));
  useEffect(show, [draft.value]);
  return html`<section class="board-preview" aria-labelledby="preview-title">
    <h2 id="preview-title">${t("console.boards.preview")}</h2>
    <p class="hint">${t("console.boards.preview_hint")}</p>
    <iframe ref=${frame} src="/board?preview" onLoad=${show} title=${t("console.boards.preview")}
            style=${{ aspectRatio: `${size.width} / ${size.height}` }}></iframe></section>`;
}

async function send() {
  const args = displayArgs(draft.value);
  if (target.value) return sendOne(target.value, { command: "display", args });
  const r = await api("POST", "/api/v1/devices/commands",
                      { command: "display", args, area: session.value.area.code, kind: "board" });
  return { key: r.command_batch, batch: true, devices: r.devices };
}

export function Boards() {
  const [problem, setProblem] = useState("");
  const [sent, setSent] = useState(null);
  const form = useSubmit(async () => setSent(await send()));
  useEffect(() => {
    const q = new URLSearchParams({ area: session.value.area.code, kind: "board", limit: 500 });
    api("GET", `/api/v1/devices?${q}`).then((r) => { boards.value = r.devices; setProblem(""); })
      .catch((e) => setProblem(e instanceof ApiFailure ? half(e.message) : t("console.network")));
    return on("command", acked);
  }, []);
  const board = boards.value.find((b) => b.id === target.value);
  const pick = (e) => {
    target.value = e.target.value;
    const b = boards.value.find((x) => x.id === target.value);
    if (b) draft.value = fromState(b.display);
  };
  const mayAir = session.value.rights.includes("air");
  const d = draft.value;
  const add = (type) => { draft.value = { ...d, items: [...d.items, blank(type)] }; };
  return html`<h1>${t("console.boards")}</h1>
    ${problem && html`<p class="error" role="alert">${problem}</p>`}
    <form class="board-compose" onSubmit=${form.submit}>
      <label for="board-target">${t("console.boards.target")}</label>
      <select id="board-target" value=${target.value} onChange=${pick}>
        <option value="">${t("console.boards.all", { n: boards.value.length })}</option>
        ${boards.value.map((b) => html`<option value=${b.id}>${b.name} · ${b.area}</option>`)}
      </select>
      <fieldset class="layout"><legend>${t("console.boards.layout")}</legend>
        ${["full", "split"].map((l) => html`<label class="check"><input type="radio" name="layout" value=${l}
            checked=${d.layout === l} onChange=${() => { draft.value = { ...d, layout: l }; }} />
          ${l === "full" ? t("console.boards.full") : t("console.boards.split")}</label>`)}
      </fieldset>
      <label for="board-ticker">${t("console.boards.ticker")}</label>
      <input id="board-ticker" maxlength="2000" value=${d.ticker}
             onInput=${(e) => { draft.value = { ...draft.value, ticker: e.target.value }; }} />
      ${d.items.map((it, i) => html`<${Item} key=${i} it=${it} i=${i} />`)}
      <div class="add">
        <button type="button" onClick=${() => add("text")}>${t("console.boards.add_text")}</button>
        <button type="button" onClick=${() => add("image")}>${t("console.boards.add_image")}</button>
        <button type="button" onClick=${() => add("video")}>${t("console.boards.add_video")}</button>
      </div>
      <${Preview} size=${board?.capabilities?.display || { width: 1920, height: 1080 }} />
      ${!mayAir && html`<p class="reason">${t("console.devices.no_air")}</p>`}
      <button type="submit" disabled=${!mayAir || form.busy || (!d.items.length && !d.ticker)}>
        ${t("console.boards.send")}</button>
      ${form.failure && html`<p class="error" role="alert">${form.failure.message}</p>`}
      <${Outcome} sent=${form.failure ? null : sent} />
    </form>`;
}
