// scripts/bench-web's driver: Kiln in headless Chromium (WebGPU on whatever adapter the browser
// has), Kiln natively (`kiln bench`), and ONNX Runtime Web on the same UNet, all in one run.
// Prints one JSON object, then a short table.
//
//   node scripts/web/bench.mjs [--models sd1-tiny,sd15,sd-turbo] [--size 64] [--batch 2] [--iters 3] [--profile]
//
// --profile also records a CPU profile (Chrome DevTools Protocol) of the page while Kiln's
// WebGPU figures are taken, and reports the functions with the most time of their own.
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync } from "node:fs";
import { mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { build } from "esbuild";
import { chromium } from "playwright-core";
import { writeLayout } from "./layout.mjs";
import { serve } from "./server.mjs";

const { values: opts } = parseArgs({
  options: {
    models: { type: "string", default: "sd1-tiny,sd15,sd-turbo" },
    size: { type: "string", default: "64" },
    batch: { type: "string", default: "2" },
    iters: { type: "string", default: "3" },
    profile: { type: "boolean", default: false },
  },
});
const [size, batch, iters] = [opts.size, opts.batch, opts.iters].map(Number);
const models = opts.models.split(",");
const target = resolve(process.env.CARGO_TARGET_DIR ?? "target");
const pkg = join(target, "web-pkg");
const FIXTURES = "tests/fixtures";
/** The sharp preview's decoder for the fixtures' latent space (timed on folder models). */
const TAESD = "taesd-tiny";
/** Models with weights on disk; the others are presets with random weights. */
const isFolder = (m) => existsSync(join(FIXTURES, m, "model_index.json"));

// The page: the bench entry bundled beside the engine's wasm, and ONNX Runtime Web's files.
const root = await mkdtemp(join(tmpdir(), "kiln-bench-"));
await build({
  entryPoints: { bench: "scripts/web/bench-page.ts" },
  outdir: root,
  bundle: true,
  format: "esm",
  target: "es2022",
  alias: { "kiln-wasm": join(pkg, "kiln.js"), "kiln-layout": await writeLayout(pkg) },
  logLevel: "warning",
});
execFileSync("cp", [join(pkg, "kiln_bg.wasm"), "node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.asyncify.wasm", "node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.asyncify.mjs", "node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.mjs", "node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.wasm", root]);
execFileSync("sh", ["-c", `echo '<!doctype html><script type="module" src="./bench.js"></script>' > ${root}/index.html`]);
const page = await serve({ root });
const hub = await serve({ root: FIXTURES, cors: true });
const onnxDir = join(target, "bench");
mkdirSync(onnxDir, { recursive: true });
const onnxServer = await serve({ root: onnxDir, cors: true });

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic", "--enable-unsafe-webgpu"],
});

/** Self time per function in a CDP profile: the top `n`, as shares of all samples. */
function topFunctions(profile, n = 12) {
  const byNode = new Map(profile.nodes.map((node) => [node.id, node]));
  const self = new Map();
  profile.samples.forEach((id, i) => {
    const { functionName, url } = byNode.get(id).callFrame;
    const name = `${functionName || "(anonymous)"}${url ? ` ${url.split("/").pop()}` : ""}`;
    self.set(name, (self.get(name) ?? 0) + (profile.timeDeltas[i] ?? 0));
  });
  const total = [...self.values()].reduce((a, b) => a + b, 0);
  return [...self].sort((a, b) => b[1] - a[1]).slice(0, n).map(([name, us]) => ({ name, share: +(us / total).toFixed(3), ms: +(us / 1000).toFixed(1) }));
}

/** Runs `fn(arg)` in a fresh page (one engine per page: the wasm module holds one device),
 * under the CPU profiler when `profiled`. */
async function inPage(fn, arg, profiled = false) {
  const tab = await browser.newPage();
  tab.on("pageerror", (e) => console.error(`[page] ${e.message}`));
  await tab.goto(`${page.url}/`);
  await tab.waitForFunction(() => self.benchReady);
  const adapter = await tab.evaluate(async () => {
    const a = await navigator.gpu?.requestAdapter();
    return a ? `${a.info.vendor} ${a.info.architecture} ${a.info.description}`.trim() || "unknown" : "none";
  });
  const cdp = profiled ? await tab.context().newCDPSession(tab) : null;
  if (cdp) await Promise.all([cdp.send("Profiler.enable"), cdp.send("Profiler.setSamplingInterval", { interval: 200 })]).then(() => cdp.send("Profiler.start"));
  try {
    const figures = await tab.evaluate(fn, arg);
    if (cdp) figures.profile_top_self_time = topFunctions((await cdp.send("Profiler.stop")).profile);
    return { adapter, ...figures };
  } finally {
    await tab.close();
  }
}

function native(model) {
  const arg = isFolder(model) ? join(FIXTURES, model) : model;
  // KILN_BIN names a built binary; else `cargo run --release`.
  const [cmd, prefix] = process.env.KILN_BIN ? [process.env.KILN_BIN, []] : ["cargo", ["run", "--quiet", "--release", "--bin", "kiln", "--"]];
  const out = execFileSync(cmd, [...prefix, "bench", "--model", arg, "--size", `${size}`, "--batch", `${batch}`, "--iters", `${iters}`], { encoding: "utf8" });
  const report = JSON.parse(out);
  return { device: report.device, ...report.results[0] };
}

/** The UNet of a fixture as ONNX, exported from the same weights file Kiln loads. */
function onnxFor(model) {
  const file = join(onnxDir, `${model}-unet-${size}.onnx`);
  if (!existsSync(file)) execFileSync("python3", ["scripts/export_onnx.py", "--model", join(FIXTURES, model), "--size", `${size}`, "--batch", `${batch}`, "--out", file], { stdio: "inherit" });
  return file;
}

const maxDiff = (a, b) => Object.values(a).reduce((m, v, i) => Math.max(m, Math.abs(v - b[i])), 0);
const results = [];
for (const model of models) {
  const entry = { model, native: native(model) };
  const modelArg = isFolder(model) ? `${hub.url}/${model}` : model;
  const previewDecoder = isFolder(model) && existsSync(join(FIXTURES, TAESD)) ? `${hub.url}/${TAESD}` : undefined;
  const { inputs, output, ...browserFigures } = await inPage((o) => self.kiln(o), { model: modelArg, previewDecoder, backend: "webgpu", size, batch, iters }, opts.profile);
  entry.browser = browserFigures;
  entry.browser_over_native = browserFigures.unet_ms_per_call / entry.native.unet_ms_per_call;
  if (isFolder(model)) {
    // The page's CPU path (wasm). A full-size model's f32 weights would not fit wasm32's 4 GiB.
    const { inputs: _, output: cpuOutput, ...cpu } = await inPage((o) => self.kiln(o), { model: modelArg, previewDecoder, backend: "cpu", size, batch, iters });
    entry.browser_cpu = { ...cpu, max_abs_diff_vs_webgpu: maxDiff(output, cpuOutput) };
    const onnx = onnxFor(model);
    const url = `${onnxServer.url}/${onnx.slice(onnxDir.length + 1)}`;
    entry.onnxruntime_web = {};
    for (const provider of ["webgpu", "wasm"]) {
      const { output: theirs, ...figures } = await inPage((o) => self.onnxRuntime(o), { onnx: url, provider, iters, inputs });
      entry.onnxruntime_web[provider] = { ...figures, max_abs_diff_vs_kiln: maxDiff(output, theirs) };
    }
    entry.kiln_over_onnxruntime_webgpu = browserFigures.unet_ms_per_call / entry.onnxruntime_web.webgpu.unet_ms_per_call;
    entry.kiln_cpu_over_onnxruntime_wasm = cpu.unet_ms_per_call / entry.onnxruntime_web.wasm.unet_ms_per_call;
  }
  results.push(entry);
}
const report = { size, batch, iters, chromium: browser.version(), results };
await browser.close();
await Promise.all([page.close(), hub.close(), onnxServer.close()]);

console.log(JSON.stringify(report, null, 1));
const ms = (v) => (v === undefined ? "–" : v.toFixed(1));
console.log(`\nms per UNet call (batch ${batch}, ${size}²) | Kiln page WebGPU | ORT-web WebGPU | Kiln page CPU | ORT-web wasm | Kiln native | dispatches (Kiln / ORT) | Kiln submits`);
for (const r of results) {
  const o = r.onnxruntime_web;
  const cells = [r.browser.unet_ms_per_call, o?.webgpu.unet_ms_per_call, r.browser_cpu?.unet_ms_per_call, o?.wasm.unet_ms_per_call, r.native.unet_ms_per_call].map(ms);
  console.log(`${r.model} | ${cells.join(" | ")} | ${r.browser.dispatches_per_unet_call} / ${o?.webgpu.dispatches_per_unet_call ?? "–"} | ${r.browser.submits_per_unet_call}`);
}
for (const { model, browser, browser_cpu } of results.filter((r) => r.browser.step_ms !== undefined)) {
  for (const [path, b] of [["WebGPU", browser], ["CPU", browser_cpu]]) {
    const sharp = b.sharp ? `, ${ms(b.sharp.step_ms_with_preview)} ms with the sharp one against ${ms(b.sharp.step_ms)} (${(100 * b.sharp.preview_cost).toFixed(1)}%)` : "";
    console.log(`${model} (${path}): a guided step in the page takes ${ms(b.step_ms)} ms, ${ms(b.step_ms_with_preview)} ms with the live preview (${(100 * b.preview_cost).toFixed(1)}%)${sharp}`);
  }
}
