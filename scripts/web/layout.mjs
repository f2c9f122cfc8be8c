// The engine's layout facts (crate/src/layout.rs) as JSON, read from the built wasm module in
// Node, so the bundles import them (as "kiln-layout") instead of restating them.
import { readFile, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

/** Writes `PKG/layout.json` unless it is newer than the wasm; returns its path. */
export async function writeLayout(pkg) {
  const [wasm, json] = [join(pkg, "kiln_bg.wasm"), join(pkg, "layout.json")];
  const mtime = (path) => stat(path).then((s) => s.mtimeMs, () => 0);
  if ((await mtime(json)) > (await mtime(wasm))) return json;
  const engine = await import(pathToFileURL(join(pkg, "kiln.js")).href);
  engine.initSync({ module: await readFile(wasm) });
  await writeFile(json, JSON.stringify(engine.layout(), null, 1));
  return json;
}
