// Dates and times as a Vietnamese operator reads them: dd/mm/yyyy and 24-hour HH:MM in
// Asia/Ho_Chi_Minh whatever the browser's own zone (a laptop set to UTC must not shift a bulletin).
const ZONE = "Asia/Ho_Chi_Minh";
const parts = new Intl.DateTimeFormat("en-GB", {
  timeZone: ZONE, year: "numeric", month: "2-digit", day: "2-digit",
  hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23",
});

function fields(epochSeconds) {
  const out = {};
  for (const p of parts.formatToParts(new Date(epochSeconds * 1000))) out[p.type] = p.value;
  return out;
}

export function date(epochSeconds) {
  const f = fields(epochSeconds);
  return `${f.day}/${f.month}/${f.year}`;
}

export function time(epochSeconds) {
  const f = fields(epochSeconds);
  return `${f.hour}:${f.minute}`;
}

export function dateTime(epochSeconds) {
  return epochSeconds ? `${time(epochSeconds)} ${date(epochSeconds)}` : "";
}

// A date typed dd/mm/yyyy -> yyyy-mm-dd (+ `plus` days), or null when it is no calendar date.
export function isoDay(text, plus = 0) {
  const m = /^(\d{1,2})\/(\d{1,2})\/(\d{4})$/.exec(text.trim());
  if (!m) return null;
  const d = new Date(Date.UTC(+m[3], +m[2] - 1, +m[1]));
  if (d.getUTCDate() !== +m[1] || d.getUTCMonth() !== +m[2] - 1) return null;
  d.setUTCDate(d.getUTCDate() + plus);
  return d.toISOString().slice(0, 10);
}
