// The console's entry: texts, the session, and the screens (login, account). Preact + htm:
// every text goes through the template, so it is rendered escaped.
import { render } from "preact";
import { signal } from "@preact/signals";
import { html, t, lang, setLang, half, loadTexts } from "./i18n.js";
import { api, session, ApiFailure } from "./api.js";

const failure = signal("");

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
  const logout = async () => {
    try { await api("DELETE", "/api/v1/auth/session"); } finally { session.value = null; }
  };
  return html`<header><strong>${t("console.title")}</strong>
      <span class="who">${s.user.username} · ${s.area.name}</span>
      <${LangSwitch} /><button type="button" onClick=${logout}>${t("console.logout")}</button>
    </header>
    <main><h1>${t("console.account")}</h1>
      <p>${t("console.area")}: <span class="area">${s.area.name}</span></p>
      <nav aria-label=${t("console.area_path")}><ol class="path">
        ${s.area.path.map((a) => html`<li>${a.name}</li>`)}</ol></nav></main>`;
}

function App() { return session.value ? html`<${Shell} />` : html`<${Login} />`; }

await loadTexts();
try { session.value = await api("GET", "/api/v1/auth/me"); } catch { session.value = null; }
render(html`<${App} />`, document.getElementById("app"));
