// Calls to /api/v1 with the session cookie; the CSRF value stays in memory only and goes with
// every unsafe method. A 401 anywhere ends the session in the page (back to login).
import { signal } from "@preact/signals";

export const session = signal(null); // {user, area, rights, csrf} or null

export class ApiFailure extends Error {
  constructor(status, body) { super(body.error || String(status)); this.status = status; this.field = body.field; }
}

export async function api(method, path, body) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && session.value?.csrf) headers["X-CSRF-Token"] = session.value.csrf;
  const r = await fetch(path, { method, headers, credentials: "same-origin",
                                body: body === undefined ? undefined : JSON.stringify(body) });
  if (r.status === 204) return null;
  const data = await r.json().catch(() => ({}));
  if (!r.ok) {
    if (r.status === 401 && path !== "/api/v1/auth/session") session.value = null;
    throw new ApiFailure(r.status, data);
  }
  return data;
}
