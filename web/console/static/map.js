// A map without tiles (nodes run on closed networks): the areas and devices that have coordinates
// (areas' lat/lon from the tree, devices' GPS from their heartbeat) drawn as an SVG, every marker
// a link with its name, reachable by keyboard.
import { html, t, word } from "./i18n.js";

const W = 1000;
const H = 640;
const MARGIN = 70;

function project(points) {
  const lats = points.map((p) => p.lat);
  const lons = points.map((p) => p.lon);
  const [s, n, w, e] = [Math.min(...lats), Math.max(...lats), Math.min(...lons), Math.max(...lons)];
  const shrink = Math.cos(((s + n) / 2) * Math.PI / 180); // a degree of longitude is shorter
  const spanX = Math.max((e - w) * shrink, 1e-6);
  const spanY = Math.max(n - s, 1e-6);
  const scale = Math.min((W - 2 * MARGIN) / spanX, (H - 2 * MARGIN) / spanY);
  const x0 = (W - spanX * scale) / 2;
  const y0 = (H - spanY * scale) / 2;
  return (p) => [x0 + (p.lon - w) * shrink * scale, y0 + (n - p.lat) * scale];
}

export function DeviceMap({ areas, devices, onArea }) {
  const placed = [
    ...areas.filter((a) => a.lat != null && a.lon != null)
      .map((a) => ({ kind: "area", key: a.code, name: a.name, lat: a.lat, lon: a.lon, area: a })),
    ...devices.filter((d) => Array.isArray(d.telemetry?.gps))
      .map((d) => ({ kind: "device", key: d.id, name: d.name, lat: d.telemetry.gps[0],
                     lon: d.telemetry.gps[1], status: d.status })),
  ];
  if (!placed.length) return html`<p class="map-empty">${t("console.devices.map_empty")}</p>`;
  const at = project(placed);
  return html`<figure class="device-map">
    <svg viewBox="0 0 ${W} ${H}" role="group" aria-label=${t("console.devices.map")}>
      <rect class="sea" x="0" y="0" width=${W} height=${H} />
      ${placed.map((p) => {
        const [x, y] = at(p);
        if (p.kind === "area") {
          const pick = (e) => { e.preventDefault(); onArea(p.area); };
          return html`<a key=${p.key} href="#/devices" class="area-mark" data-code=${p.key} onClick=${pick}
              aria-label=${t("console.devices.map_area", { name: p.name })}>
            <rect x=${x - 9} y=${y - 9} width="18" height="18" />
            <text x=${x + 14} y=${y + 6}>${p.name}</text></a>`;
        }
        return html`<a key=${p.key} href=${`#/devices/${encodeURIComponent(p.key)}`} class="device-mark ${p.status}"
            data-id=${p.key} aria-label=${`${p.name}: ${word("status", p.status)}`}>
          <circle cx=${x} cy=${y} r="10" /><text x=${x + 14} y=${y - 10}>${p.name}</text></a>`;
      })}
    </svg>
    <figcaption>${t("console.devices.map_legend")}</figcaption></figure>`;
}
