// Forms that show the API's refusal where it belongs: a 422/403 naming a field goes under that
// field (aria-describedby), anything else above the submit button.
import { useState } from "preact/hooks";
import { html, t, half } from "./i18n.js";
import { ApiFailure } from "./api.js";

export function useSubmit(action) {
  const [failure, setFailure] = useState(null); // {field, message} or null
  const [busy, setBusy] = useState(false);
  const [done, setDone] = useState(false);
  const submit = async (ev) => {
    ev.preventDefault();
    setBusy(true); setDone(false);
    try {
      await action(new FormData(ev.target), ev.target);
      setFailure(null); setDone(true);
    } catch (e) {
      setFailure(e instanceof ApiFailure ? { field: e.field, message: half(e.message) }
                                         : { field: null, message: t("console.network") });
    } finally { setBusy(false); }
  };
  return { submit, failure, busy, done };
}

export function Field({ name, label, failure, ...input }) {
  const wrong = failure && failure.field === name;
  return html`<label for=${name}>${label}</label>
    <input id=${name} name=${name} aria-invalid=${wrong ? "true" : "false"}
           aria-describedby=${wrong ? `${name}-error` : undefined} ...${input} />
    ${wrong && html`<p class="error" id=${`${name}-error`} role="alert">${failure.message}</p>`}`;
}

export function FormError({ failure }) {
  return failure && !failure.field ? html`<p class="error" role="alert">${failure.message}</p>` : null;
}
