// Assembles dist/ from public/, the TypeScript in web/src and the engine's wasm-bindgen
// output, then stamps the service worker with the shell's file list and a content hash.
//
//   node scripts/web/bundle.mjs WASM_PKG_DIR
import { build } from "esbuild";
import { createHash } from "node:crypto";
import { cp, readFile, readdir, rm, writeFile } from "node:fs/promises";
import { join, relative, resolve } from "node:path";
import { gzipSync } from "node:zlib";
import { writeLayout } from "./layout.mjs";

const pkg = resolve(process.argv[2] ?? "target/web-pkg");
const dist = resolve("dist");

await rm(dist, { recursive: true, force: true });
await cp("public", dist, { recursive: true });
await cp(join(pkg, "kiln_bg.wasm"), join(dist, "kiln_bg.wasm"));
await build({
  entryPoints: { main: "web/src/main.ts", worker: "web/src/worker.ts" },
  outdir: dist,
  bundle: true,
  format: "esm",
  target: "es2022",
  minify: true,
  sourcemap: "linked",
  alias: { "kiln-wasm": join(pkg, "kiln.js"), "kiln-layout": await writeLayout(pkg) },
  logLevel: "warning",
});

async function files(dir) {
  const entries = await readdir(dir, { withFileTypes: true, recursive: true });
  return entries.filter((e) => e.isFile()).map((e) => relative(dist, join(e.parentPath, e.name))).sort();
}

// Everything the page needs offline; source maps only serve developers.
const shell = (await files(dist)).filter((f) => f !== "sw.js" && !f.endsWith(".map"));
const hash = createHash("sha256");
for (const f of shell) hash.update(f).update(await readFile(join(dist, f)));
const sw = (await readFile(join(dist, "sw.js"), "utf8"))
  .replace('const VERSION = "dev";', `const VERSION = "${hash.digest("hex").slice(0, 16)}";`)
  .replace("const SHELL = [];", `const SHELL = ${JSON.stringify(["./", ...shell.map((f) => `./${f}`)])};`);
await writeFile(join(dist, "sw.js"), sw);

const wasm = await readFile(join(dist, "kiln_bg.wasm"));
const mib = (n) => `${(n / 2 ** 20).toFixed(2)} MiB`;
console.log(`dist/ built: kiln_bg.wasm ${mib(wasm.length)} raw, ${mib(gzipSync(wasm, { level: 9 }).length)} gzip`);
