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

// The server's words (classes, roles, rights, device statuses) in the chosen language; spelled
// out so every key used is visible in the source. An unknown word shows as it came.
const words = {
  class: () => ({ background: t("console.class.background"), normal: t("console.class.normal"),
                  priority: t("console.class.priority"), emergency: t("console.class.emergency") }),
  role: () => ({ admin: t("console.role.admin"), approver: t("console.role.approver"),
                 operator: t("console.role.operator"), editor: t("console.role.editor"),
                 viewer: t("console.role.viewer") }),
  right: () => ({ read: t("console.right.read"), edit: t("console.right.edit"),
                  air: t("console.right.air"), approve: t("console.right.approve"),
                  admin: t("console.right.admin"), direct: t("console.right.direct"),
                  emergency: t("console.right.emergency") }),
  status: () => ({ online: t("console.status.online"), offline: t("console.status.offline"),
                   fault: t("console.status.fault") }),
};

export function word(kind, value) {
  return words[kind]()[value] ?? String(value);
}
