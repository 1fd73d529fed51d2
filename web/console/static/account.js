// "Who am I and which area", and changing one's own password.
import { html, t, word } from "./i18n.js";
import { api, session, ApiFailure } from "./api.js";
import { useSubmit, Field, FormError } from "./forms.js";

export function Account() {
  const s = session.value;
  const pw = useSubmit(async (f, form) => {
    if (f.get("new") !== f.get("again")) {
      throw new ApiFailure(422, { error: t("console.password_mismatch"), field: "again" });
    }
    await api("POST", "/api/v1/auth/password", { current: f.get("current"), new: f.get("new") });
    form.reset();
  });
  return html`<h1>${t("console.account")}</h1>
    <dl class="facts">
      <dt>${t("console.username")}</dt><dd class="username">${s.user.username}</dd>
      <dt>${t("console.role")}</dt><dd>${word("role", s.user.role)}</dd>
      <dt>${t("console.area")}</dt><dd class="area">${s.area.name}</dd>
      <dt>${t("console.rights")}</dt><dd>${s.rights.map((r) => word("right", r)).join(", ")}</dd>
    </dl>
    <nav aria-label=${t("console.area_path")}><ol class="path">
      ${s.area.path.map((a) => html`<li>${a.name}</li>`)}</ol></nav>
    <h2>${t("console.change_password")}</h2>
    <form onSubmit=${pw.submit} class="password">
      <${Field} name="current" label=${t("console.current_password")} type="password"
                autocomplete="current-password" required failure=${pw.failure} />
      <${Field} name="new" label=${t("console.new_password")} type="password"
                autocomplete="new-password" required failure=${pw.failure} />
      <${Field} name="again" label=${t("console.new_password_again")} type="password"
                autocomplete="new-password" required failure=${pw.failure} />
      <${FormError} failure=${pw.failure} />
      ${pw.done && html`<p class="ok" role="status">${t("console.password_changed")}</p>`}
      <button type="submit" disabled=${pw.busy}>${t("console.change_password")}</button>
    </form>`;
}
