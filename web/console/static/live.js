// The console's one event stream (/api/v1/events, Server-Sent Events): opened at login, closed at
// logout; screens subscribe to the event types they show. The browser reconnects by itself
// (the server sends retry: 1000); after a reconnect or a `resync` every screen reloads its view,
// since events may have been missed meanwhile.
const handlers = new Map(); // type -> Set of functions
let source = null;
const TYPES = ["onair", "device", "emergency", "programme", "schedule", "command", "emergency_status",
               "inbox"];

function emit(type, data) {
  for (const fn of handlers.get(type) || []) fn(data);
}

export function on(type, fn) {
  if (!handlers.has(type)) handlers.set(type, new Set());
  handlers.get(type).add(fn);
  return () => handlers.get(type).delete(fn);
}

export function open() {
  if (source) return;
  source = new EventSource("/api/v1/events");
  let opened = false;
  source.onopen = () => { if (opened) emit("resync", {}); opened = true; };
  source.addEventListener("resync", () => emit("resync", {}));
  for (const type of TYPES) {
    source.addEventListener(type, (ev) => emit(type, JSON.parse(ev.data)));
  }
}

export function close() {
  if (source) source.close();
  source = null;
}
