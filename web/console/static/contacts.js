// Who is told of the alerts of the caller's subtree (admin tab "Cảnh báo"): people by e-mail,
// systems by a signed webhook whose secret is shown once. A contact hears its area's alerts and
// those of every area below it.
import { useEffect, useState } from "preact/hooks";
import { html, t, half } from "./i18n.js";
import { api, ApiFailure } from "./api.js";
import { useSubmit, Field, FormError } from "./forms.js";

function NewContact({ areas, onCreated }) {
  const [secret, setSecret] = useState("");
  const form = useSubmit(async (f, el) => {
    const body = { name: f.get("contact-name"), area: f.get("contact-area") };
    body[f.get("channel")] = f.get("address");
    let made;
    try {
      made = await api("POST", "/api/v1/alert-contacts", body);
    } catch (e) { // the API names its fields; the form's are the same but for the address
      if (e instanceof ApiFailure && ["email", "webhook"].includes(e.field)) e.field = "address";
      if (e instanceof ApiFailure && ["name", "area"].includes(e.field)) e.field = `contact-${e.field}`;
      throw e;
    }
    setSecret(made.secret || "");
    el.reset();
    onCreated();
  });
  return html`<form class="new-contact" onSubmit=${form.submit}>
    <h2>${t("console.contacts.new")}</h2>
    <${Field} name="contact-name" label=${t("console.contacts.name")} required
              failure=${form.failure} />
    <${Field} name="contact-area" label=${t("console.area")} list="contact-areas" required
              failure=${form.failure} />
    <datalist id="contact-areas">${areas.map((a) => html`<option value=${a.code}>${a.name}</option>`)}</datalist>
    <label for="channel">${t("console.contacts.channel")}</label>
    <select id="channel" name="channel">
      <option value="email">${t("console.contacts.email")}</option>
      <option value="webhook">${t("console.contacts.webhook")}</option></select>
    <${Field} name="address" label=${t("console.contacts.address")} required autocomplete="off"
              failure=${form.failure} />
    <${FormError} failure=${form.failure} />
    ${form.done && secret && html`<p class="secret" role="status">${t("console.contacts.secret")}
      <code>${secret}</code></p>`}
    <button type="submit" disabled=${form.busy}>${t("console.contacts.add")}</button></form>`;
}

export function Contacts({ areas }) {
  const [contacts, setContacts] = useState(null);
  const [failure, setFailure] = useState("");
  const names = Object.fromEntries(areas.map((a) => [a.code, a.name]));
  const fail = (e) => setFailure(e instanceof ApiFailure ? half(e.message) : t("console.network"));
  const reload = () => api("GET", "/api/v1/alert-contacts")
    .then((r) => { setContacts(r.contacts); setFailure(""); }).catch(fail);
  useEffect(() => { reload(); }, []);
  const remove = (c) => api("DELETE", `/api/v1/alert-contacts/${c.id}`).then(reload).catch(fail);
  return html`<p class="note">${t("console.contacts.about")}</p>
    <${NewContact} areas=${areas} onCreated=${reload} />
    <h2>${t("console.contacts")}</h2>
    ${failure && html`<p class="error" role="alert">${failure}</p>`}
    ${!contacts ? html`<p class="loading">${t("console.loading")}</p>`
      : !contacts.length ? html`<p>${t("console.contacts.none")}</p>` : html`<ul class="contacts">
      ${contacts.map((c) => html`<li key=${c.id} data-contact=${c.id}>
        <strong>${c.name}</strong> · ${names[c.area] || c.area} · ${c.email || c.webhook}
        <button type="button" onClick=${() => remove(c)}
                aria-label=${t("console.contacts.remove", { name: c.name })}>
          ${t("console.contacts.remove_short")}</button></li>`)}</ul>`}`;
}
