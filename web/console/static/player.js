// Listening in the page to the node's own audio (GET /api/v1/media/ID/audio: the WAV as it airs,
// seekable through Range). The <audio> element is made only when asked for, so a long list
// downloads nothing until someone listens.
import { useState } from "preact/hooks";
import { html, t } from "./i18n.js";

export function audioUrl(id) {
  return `/api/v1/media/${encodeURIComponent(id)}/audio`;
}

export function Listen({ id, title, open = false }) {
  const [shown, setShown] = useState(open);
  if (!shown) {
    return html`<button type="button" class="listen" onClick=${() => setShown(true)}
      aria-label=${t("console.library.listen_to", { title })}>${t("console.library.listen")}</button>`;
  }
  return html`<audio class="player" controls autoplay=${!open} preload="metadata" src=${audioUrl(id)}
    aria-label=${t("console.library.listen_to", { title })}></audio>`;
}

// m:ss or h:mm:ss of a duration in seconds ("" when unknown).
export function length(seconds) {
  if (seconds == null) return "";
  const s = Math.round(seconds);
  const mm = String(Math.floor(s / 60) % 60), ss = String(s % 60).padStart(2, "0");
  return s >= 3600 ? `${Math.floor(s / 3600)}:${mm.padStart(2, "0")}:${ss}` : `${mm}:${ss}`;
}
