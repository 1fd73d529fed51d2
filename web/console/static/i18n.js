// Texts from /console/catalogue.json in one language (Vietnamese unless English was chosen; only
// the language is remembered). API errors arrive as "vi / en": `half` picks the chosen side.
import { h } from "preact";
import htm from "htm";
import { signal } from "@preact/signals";

export const html = htm.bind(h);
export const lang = signal(localStorage.getItem("loa.lang") === "en" ? "en" : "vi");
let texts = {};

export async function loadTexts() {
  texts = await (await fetch("/console/catalogue.json")).json();
  document.documentElement.lang = lang.value;
}

export function setLang(l) {
  lang.value = l;
  localStorage.setItem("loa.lang", l);
  document.documentElement.lang = l;
}

export function t(key, params = {}) {
  const text = (texts[key] || {})[lang.value] ?? key;
  return text.replace(/\{(\w+)\}/g, (_, k) => String(params[k] ?? ""));
}

export function half(bilingual) {
  const parts = String(bilingual).split(" / ");
  return parts.length === 2 ? parts[lang.value === "vi" ? 0 : 1] : bilingual;
}
