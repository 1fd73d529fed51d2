// `make console`: copy the ES modules the console imports from node_modules (installed by
// `npm ci` from package-lock.json) to static/vendor/<name>-<version>.mjs, and check that the
// import map of static/index.html names exactly these files: the server caches vendor files for
// a year, so a new version must get a new name.
import { copyFileSync, mkdirSync, readFileSync, rmSync } from "node:fs";

const MODULES = { // import specifier -> [package, file in it, vendored name]
  "preact": ["preact", "dist/preact.mjs", "preact"],
  "preact/hooks": ["preact", "hooks/dist/hooks.mjs", "preact-hooks"],
  "@preact/signals": ["@preact/signals", "dist/signals.mjs", "signals"],
  "@preact/signals-core": ["@preact/signals-core", "dist/signals-core.mjs", "signals-core"],
  "htm": ["htm", "dist/htm.mjs", "htm"],
};
const here = new URL(".", import.meta.url).pathname;
const vendor = `${here}static/vendor/`;
rmSync(vendor, { recursive: true, force: true });
mkdirSync(vendor, { recursive: true });
const wanted = {};
for (const [spec, [pkg, file, name]] of Object.entries(MODULES)) {
  const { version } = JSON.parse(readFileSync(`${here}node_modules/${pkg}/package.json`, "utf8"));
  copyFileSync(`${here}node_modules/${pkg}/${file}`, `${vendor}${name}-${version}.mjs`);
  wanted[spec] = `/console/static/vendor/${name}-${version}.mjs`;
}
const html = readFileSync(`${here}static/index.html`, "utf8");
const map = JSON.parse(html.match(/<script type="importmap">(.*?)<\/script>/s)[1]).imports;
if (JSON.stringify(map, Object.keys(map).sort()) !== JSON.stringify(wanted, Object.keys(wanted).sort())) {
  console.error("static/index.html: the import map must be\n" + JSON.stringify(wanted, null, 2));
  process.exit(1);
}
