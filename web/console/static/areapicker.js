// Choosing target areas of the caller's subtree (schedule, air now, emergency): the tree opened
// one level at a time (GET /api/v1/areas?parent=, so a 5,000-area province loads what is opened),
// a search that ignores case and diacritics (?q=), and ticks. Ticking an area targets its whole
// subtree (one tick for a district, or for the whole province): what lies below a ticked area is
// shown as included and cannot be ticked on its own.
import { signal } from "@preact/signals";
import { useEffect, useState } from "preact/hooks";
import { html, t, half } from "./i18n.js";
import { api, ApiFailure } from "./api.js";

const known = new Map(); // code -> {code, name, children, path: [codes from the caller's root]}
const levels = new Map(); // code -> signal([child codes] | null while loading)

function remember(area, path) {
  known.set(area.code, { code: area.code, name: area.name,
                         children: (area.children || []).length, path });
}

async function loadLevel(code) {
  if (!levels.has(code)) levels.set(code, signal(null));
  const level = levels.get(code);
  if (level.value) return;
  const data = await api("GET", `/api/v1/areas?parent=${encodeURIComponent(code)}`);
  const above = known.get(code)?.path || [code];
  data.areas.forEach((a) => remember(a, [...above, a.code]));
  level.value = data.areas.map((a) => a.code);
}

export function areaName(code) {
  return known.get(code)?.name || code;
}

// The chosen areas that cover `code` (itself or one above it).
function coveredBy(chosen, code) {
  const path = known.get(code)?.path || [code];
  return chosen.filter((c) => path.includes(c));
}

function Tick({ code, chosen, onChange, idPrefix }) {
  const area = known.get(code);
  const own = chosen.includes(code);
  const above = !own && coveredBy(chosen, code).length > 0;
  const toggle = () => {
    if (own) { onChange(chosen.filter((c) => c !== code)); return; }
    // ticking an area drops the ticks below it: the subtree is covered by this one
    onChange([...chosen.filter((c) => !(known.get(c)?.path || []).includes(code)), code]);
  };
  const id = `${idPrefix}-${code}`;
  return html`<input type="checkbox" id=${id} checked=${own || above} disabled=${above}
      onChange=${toggle} data-code=${code} />
    <label for=${id}>${area.name}${above ? html` <span class="included">(${t("console.areas.included")})</span>` : ""}</label>`;
}

function Branch({ code, chosen, onChange, idPrefix, opened = false }) {
  const [open, setOpen] = useState(opened);
  const [failure, setFailure] = useState("");
  const area = known.get(code);
  const expand = async () => {
    if (!open) {
      try { await loadLevel(code); setFailure(""); } catch (e) {
        setFailure(e instanceof ApiFailure ? half(e.message) : t("console.network"));
        return;
      }
    }
    setOpen(!open);
  };
  const codes = levels.get(code)?.value;
  return html`<li data-code=${code}>
    <span class="pick-row">
      ${area.children > 0 && html`<button type="button" class="expand" aria-expanded=${open ? "true" : "false"}
          aria-label=${t("console.areas.open", { name: area.name })} onClick=${expand}>${open ? "▾" : "▸"}</button>`}
      <${Tick} code=${code} chosen=${chosen} onChange=${onChange} idPrefix=${idPrefix} />
    </span>
    ${failure && html`<p class="error" role="alert">${failure}</p>`}
    ${open && codes && html`<ul>${codes.map((c) => html`<${Branch} key=${c} code=${c}
        chosen=${chosen} onChange=${onChange} idPrefix=${idPrefix} />`)}</ul>`}</li>`;
}

function Search({ chosen, onChange, idPrefix }) {
  const [query, setQuery] = useState("");
  const [found, setFound] = useState(null); // {codes, more} or null
  useEffect(() => {
    const q = query.trim();
    if (!q) { setFound(null); return undefined; }
    const timer = setTimeout(async () => {
      try {
        const data = await api("GET", `/api/v1/areas?q=${encodeURIComponent(q)}&limit=20`);
        data.areas.forEach((a) => remember(a, a.path.map((p) => p.code)));
        setFound({ codes: data.areas.map((a) => a.code), more: data.more });
      } catch { setFound({ codes: [], more: false }); }
    }, 250); // typed, not each key stroke
    return () => clearTimeout(timer);
  }, [query]);
  const searchId = `${idPrefix}-search`;
  return html`<label for=${searchId}>${t("console.areas.search")}</label>
    <input type="search" id=${searchId} value=${query} autocomplete="off"
      onInput=${(e) => setQuery(e.target.value)} />
    ${found && (found.codes.length
      ? html`<ul class="found">${found.codes.map((c) => html`<li key=${c}>
          <${Tick} code=${c} chosen=${chosen} onChange=${onChange} idPrefix=${`${idPrefix}-q`} /></li>`)}
          ${found.more && html`<li>${t("console.areas.more")}</li>`}</ul>`
      : html`<p>${t("console.areas.none_found")}</p>`)}`;
}

// `value`: the chosen codes; `onChange(codes)`; `failure` from forms.js names the field `name`.
export function AreaPicker({ root, value, onChange, legend, name = "targets", failure }) {
  const [ready, setReady] = useState(known.has(root.code));
  useEffect(() => {
    if (!known.has(root.code)) remember({ ...root, children: [] }, [root.code]);
    loadLevel(root.code).then(() => {
      known.get(root.code).children = levels.get(root.code).value.length;
      setReady(true);
    }).catch(() => setReady(true));
  }, [root.code]);
  const idPrefix = `pick-${name}`;
  const wrong = failure && failure.field === name;
  return html`<fieldset class="area-picker" id=${name} aria-describedby=${wrong ? `${name}-error` : undefined}>
    <legend>${legend}</legend>
    <ul class="chosen" aria-label=${t("console.areas.chosen")}>
      ${value.length === 0 && html`<li>${t("console.areas.none_chosen")}</li>`}
      ${value.map((c) => html`<li key=${c}><span>${areaName(c)}</span>
        <button type="button" aria-label=${t("console.areas.remove", { name: areaName(c) })}
          onClick=${() => onChange(value.filter((x) => x !== c))}>×</button></li>`)}</ul>
    <${Search} chosen=${value} onChange=${onChange} idPrefix=${idPrefix} />
    ${ready ? html`<ul class="pick-tree"><${Branch} code=${root.code} chosen=${value}
        onChange=${onChange} idPrefix=${idPrefix} opened=${true} /></ul>`
      : html`<p class="loading">${t("console.loading")}</p>`}
    ${wrong && html`<p class="error" id=${`${name}-error`} role="alert">${failure.message}</p>`}
  </fieldset>`;
}
