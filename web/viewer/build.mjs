// Bundle the viewer (src/index.js + Cornerstone3D) into one offline script shipped inside the Python package.
// Run by `npm run build` (the Makefile's install rule runs `npm ci` then this). The output is generated: not tracked.
import { build } from "esbuild";
import { copyFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import path from "node:path";

const here = path.dirname(fileURLToPath(import.meta.url));
const out = path.resolve(here, "../../src/lungcad/web/static/viewer/viewer.js");

await build({
  entryPoints: [path.join(here, "src/index.js")],
  outfile: out,
  bundle: true,
  format: "iife",
  target: ["es2020"],
  minify: true,
  sourcemap: false,
  legalComments: "linked", // third-party licence notices go to viewer.js.LEGAL.txt beside the bundle
  define: { "process.env.NODE_ENV": '"production"' },
  // Not used by a 2-D stack viewer and Node-only: see src/stubs/xmlbuilder2.js.
  alias: { xmlbuilder2: path.join(here, "src/stubs/xmlbuilder2.js") },
  logLevel: "warning",
});
console.log(`viewer bundle: ${path.relative(process.cwd(), out)}`);

// The API documentation page (/docs, lungcad.web.routes.api) uses Swagger UI's prebuilt files, copied as
// they are (swagger-ui-dist 5 reads OpenAPI 3.1, which FastAPI writes).
for (const name of ["swagger-ui-bundle.js", "swagger-ui.css", "LICENSE"]) {
  copyFileSync(path.join(here, "node_modules/swagger-ui-dist", name), path.join(path.dirname(out), name === "LICENSE" ? "swagger-ui.LICENSE.txt" : name));
}
