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
