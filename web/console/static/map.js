// A map without tiles (nodes run on closed networks): the areas and devices that have coordinates
// (GET /api/v1/map.geojson: areas' lat/lon from the area list, devices' GPS from their heartbeat)
// drawn as an SVG, every marker a link with its name, reachable by keyboard.
import { useEffect, useState } from "preact/hooks";
import { html, t, word } from "./i18n.js";
import { api } from "./api.js";

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

// The areas just below `area` and the devices of its subtree (filtered as the list is); read
// again whenever `version` (the list shown) changes, so statuses follow the live events.
export function DeviceMap({ area, status, kind, version, onArea }) {
  const [geo, setGeo] = useState(null);
  useEffect(() => {
    let gone = false;
    const q = new URLSearchParams({ area, depth: 1 });
    if (status) q.set("status", status);
    if (kind) q.set("kind", kind);
    api("GET", `/api/v1/map.geojson?${q}`).then((g) => { if (!gone) setGeo(g); },
                                                 () => { if (!gone) setGeo({ features: [] }); });
    return () => { gone = true; };
  }, [area, status, kind, version]);
  if (!geo) return html`<p class="loading">${t("console.loading")}</p>`;
  const placed = geo.features.filter((f) => f.properties.code !== area).map(({ geometry, properties: p }) => {
    const [lon, lat] = geometry.coordinates;
    return p.kind === "area"
      ? { kind: "area", key: p.code, name: p.name, lat, lon, area: { code: p.code, name: p.name } }
      : { kind: "device", key: p.id, name: p.name, lat, lon, status: p.status };
  });
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
