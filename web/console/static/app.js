// The console's entry: texts, the session, the screens and the address bar (#/overview, ...).
// Preact + htm: every text goes through the template, so it is rendered escaped.
import { render } from "preact";
import { signal } from "@preact/signals";
import { useEffect } from "preact/hooks";
import { html, t, lang, setLang, half, loadTexts } from "./i18n.js";
import { api, session, ApiFailure } from "./api.js";
import * as live from "./live.js";
import { Overview } from "./overview.js";
import { Account } from "./account.js";
import { Air } from "./air.js";
import { Schedule } from "./schedule.js";
import { Inbox } from "./inbox.js";
import { Library } from "./library.js";
import { Programmes } from "./programmes.js";
import { Emergency } from "./emergency.js";
import { Devices, Device } from "./devices.js";
import { Boards } from "./boards.js";
import { Reports } from "./reports.js";
import { Admin } from "./admin.js";

// Each screen: its address (#/id or #/id/arg), its title's text key, who may see it (`why`: the
// reason shown to whoever else opens its address), and what it draws. #/overview/CODE opens the
// overview at another area (the server decides if it may).
const SCREENS = [
  { id: "overview", key: "console.overview", may: (s) => s.rights.includes("read"),
    draw: (s, arg) => html`<${Overview} key=${arg || s.area.code} root=${arg || s.area.code} />` },
  { id: "air", key: "console.air.title", may: (s) => s.rights.includes("air"),
    why: () => t("console.air.no_right"), draw: () => html`<${Air} />` },
  { id: "library", key: "console.library", may: (s) => s.rights.includes("read"),
    draw: () => html`<${Library} />` },
  { id: "programmes", key: "console.programmes", may: (s) => s.rights.includes("read"),
    draw: () => html`<${Programmes} />` },
  { id: "schedule", key: "console.schedule", may: (s) => s.rights.includes("read"),
    draw: (s, arg) => html`<${Schedule} key=${arg || s.area.code} area=${arg || s.area.code} />` },
  { id: "inbox", key: "console.inbox", may: (s) => s.rights.includes("read"),
    draw: () => html`<${Inbox} />` },
  { id: "emergency", key: "console.emergency.title",
    may: (s) => s.rights.includes("emergency") && s.rights.includes("air"),
    why: () => t("console.emergency.no_right"),
    draw: (s, arg) => html`<${Emergency} key=${arg} id=${arg} />` },
  { id: "devices", key: "console.devices", may: (s) => s.rights.includes("read"),
    draw: (s, arg) => (arg ? html`<${Device} key=${arg} id=${arg} />` : html`<${Devices} />`) },
  { id: "boards", key: "console.boards", may: (s) => s.rights.includes("read"), draw: () => html`<${Boards} />` },
  { id: "reports", key: "console.reports", may: (s) => s.rights.includes("read"),
    draw: (s, arg) => html`<${Reports} key=${arg} area=${arg || s.area.code} />` },
  { id: "admin", key: "console.admin", may: (s) => s.rights.includes("admin"),
    why: () => t("console.admin.no_right"), draw: (s, arg) => html`<${Admin} tab=${arg} />` },
  { id: "account", key: "console.account", may: () => true, draw: () => html`<${Account} />` },
];

const failure = signal("");
const route = signal(location.hash.slice(2));
addEventListener("hashchange", () => { route.value = location.hash.slice(2); });

function Login() {
  const submit = async (ev) => {
    ev.preventDefault();
    const f = new FormData(ev.target);
    try {
      session.value = await api("POST", "/api/v1/auth/session",
                                { username: f.get("username"), password: f.get("password") });
      failure.value = "";
    } catch (e) { failure.value = e instanceof ApiFailure ? e.message : t("console.network"); }
  };
  return html`<main class="login"><h1>${t("console.title")}</h1>
    <form onSubmit=${submit}>
      <label for="username">${t("console.username")}</label>
      <input id="username" name="username" autocomplete="username" required />
      <label for="password">${t("console.password")}</label>
      <input id="password" name="password" type="password" autocomplete="current-password" required />
      ${failure.value && html`<p class="error" role="alert">${half(failure.value)}</p>`}
      <button type="submit">${t("console.login")}</button>
    </form><${LangSwitch} /></main>`;
}

function LangSwitch() {
  const other = lang.value === "vi" ? "en" : "vi";
  return html`<button type="button" class="lang" lang=${other} onClick=${() => setLang(other)}>
    ${t("console.switch_language")}</button>`;
}

function Shell() {
  const s = session.value;
  const mine = SCREENS.filter((x) => x.may(s));
  const [id, ...rest] = route.value.split("/");
  const screen = mine.find((x) => x.id === id) || mine[0];
  const arg = screen.id === id ? decodeURIComponent(rest.join("/")) : "";
  const barred = SCREENS.find((x) => x.id === id && x.why && !x.may(s));
  const logout = async () => {
    try { await api("DELETE", "/api/v1/auth/session"); } finally { session.value = null; }
  };
  useEffect(() => { // the phone's row of screens shows the current one
    document.querySelector("nav.screens [aria-current=page]")
      ?.scrollIntoView({ block: "nearest", inline: "nearest" });
  }, [screen.id]);
  return html`<header><strong>${t("console.title")}</strong>
      <span class="who">${s.user.username} · ${s.area.name}</span>
      <${LangSwitch} /><button type="button" onClick=${logout}>${t("console.logout")}</button>
    </header>
    <nav class="screens" aria-label=${t("console.screens")}><ul>
      ${mine.map((x) => html`<li><a href=${`#/${x.id}`}
        aria-current=${x === screen && !barred ? "page" : undefined}>${t(x.key)}</a></li>`)}</ul></nav>
    <main data-screen=${barred ? id : screen.id}>${barred
      ? html`<h1>${t(barred.key)}</h1><p class="error" role="alert">${barred.why()}</p>`
      : screen.draw(s, arg)}</main>`;
}

function App() {
  if (!session.value) { live.close(); return html`<${Login} />`; }
  live.open();
  return html`<${Shell} />`;
}

await loadTexts();
try { session.value = await api("GET", "/api/v1/auth/me"); } catch { session.value = null; }
render(html`<${App} />`, document.getElementById("app"));
