// Shared pieces of the browser tests: dist/ on one port, the fixture pipelines on another
// (a stand-in for the Hugging Face hub, with a request log and injectable faults), and
// headless Chromium, whose WebGPU runs on SwiftShader.
import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdtempSync, readFileSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";
import { PNG } from "pngjs";
import { serve } from "../../scripts/web/server.mjs";

const CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
  "--disable-quic",
];

export async function launch({ webgpu = true } = {}) {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: webgpu ? [...CHROMIUM_ARGS, "--enable-unsafe-webgpu"] : CHROMIUM_ARGS,
  });
}

/**
 * A browser with a profile on disk: Chrome offers to install an app only outside incognito,
 * which every `browser.newContext()` is. Resolves to the context; closing it ends the browser.
 */
export async function launchPersistent() {
  return chromium.launchPersistentContext(mkdtempSync(join(tmpdir(), "kiln-profile-")), {
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: [...CHROMIUM_ARGS, "--enable-unsafe-webgpu"],
  });
}

/** The app (dist/) and the hub (tests/fixtures/); `hub.fault(path, fault)` breaks one GET of a file. */
export async function startServers() {
  const log = [];
  const faults = new Map();
  const intercept = (path, body, method) => {
    // Like the HF hub: LFS files (the weights) state their SHA-256.
    const sha = createHash("sha256").update(body).digest("hex");
    const out = { headers: path.endsWith(".safetensors") ? { "X-Linked-Etag": `"${sha}"`, ETag: `"${sha}"` } : { ETag: `"${sha.slice(0, 40)}"` } };
    const fault = method === "GET" && faults.get(path);
    if (!fault) return out;
    faults.delete(path);
    return fault(body, out);
  };
  const app = await serve({ root: "dist" });
  const hub = await serve({ root: "tests/fixtures", cors: true, log, intercept });
  return {
    app,
    hub: { ...hub, log, fault: (path, fault) => faults.set(path, fault) },
    close: () => Promise.all([app.close(), hub.close()]),
  };
}

/** Faults for `hub.fault`. */
export const faults = {
  /**
   * Sends `n` bytes, then nothing, keeping the connection open until the fault's `drop()`.
   * A test drops it once the page has stored what it received, as how much of a dropped
   * connection's last bytes reach the page depends on the machine's load.
   */
  stall: (n) => {
    let dropped = false;
    let destroy = null;
    const fault = (_body, out) => ({
      ...out,
      stallAfter: n,
      stalled: (d) => {
        destroy = d;
        if (dropped) d();
      },
    });
    fault.drop = () => {
      dropped = true;
      destroy?.();
    };
    return fault;
  },
  /** Flips bytes in the middle while stating the true SHA-256. */
  corrupt: () => (body, out) => {
    const bad = Buffer.from(body);
    for (let i = bad.length >> 1; i < (bad.length >> 1) + 64; i++) bad[i] ^= 0xff;
    return { ...out, body: bad };
  },
  /** A shorter file with a matching length and no stated digest. */
  truncate: (n) => (body) => ({ body: body.subarray(0, n), headers: {} }),
};

/**
 * The app's URL for a model and settings, as a share link would carry them. The page would run
 * the engine on the CPU here (SwiftShader is a software adapter), so the tests force WebGPU
 * unless `settings.backend` says otherwise.
 */
export function appUrl(app, model, settings = {}) {
  return `${app.url}/?${new URLSearchParams({ model, backend: "webgpu", ...settings })}`;
}

/** Sets the generation controls by their accessible names; absent settings are left as they are. */
export async function fillSettings(page, { prompt, seed, steps, guidance, width, height, scheduler }) {
  const fields = { Prompt: prompt, Seed: seed, Steps: steps, "Guidance scale": guidance, Width: width, Height: height };
  for (const [label, value] of Object.entries(fields)) {
    if (value !== undefined) await page.getByLabel(label, { exact: true }).fill(String(value));
  }
  if (scheduler !== undefined) await page.getByLabel("Scheduler", { exact: true }).selectOption(scheduler);
}

/** The native CLI as a command and its first arguments: KILN_BIN names a built binary; else `cargo run`. */
function kilnCommand() {
  return process.env.KILN_BIN ? [process.env.KILN_BIN, []] : ["cargo", ["run", "--quiet", "--bin", "kiln", "--"]];
}

/** Runs the native CLI with `args`. */
export function runKiln(args) {
  const [cmd, prefix] = kilnCommand();
  execFileSync(cmd, [...prefix, ...args], { stdio: "pipe" }); // its stderr is in the error, should it fail
}

/**
 * Runs the native CLI with `args` and `env` added, without blocking this process (which may be
 * serving the host the CLI downloads from); resolves to its exit code and stderr.
 */
export function runKilnAsync(args, env = {}) {
  const [cmd, prefix] = kilnCommand();
  return new Promise((resolve) => {
    const child = spawn(cmd, [...prefix, ...args], { env: { ...process.env, ...env }, stdio: ["ignore", "ignore", "pipe"] });
    let stderr = "";
    child.stderr.on("data", (d) => (stderr += d));
    child.on("close", (code) => resolve({ code, stderr }));
  });
}

/** Runs the native CLI with `args` and `--out`; returns the PNG. */
export function kiln(args) {
  const out = join(mkdtempSync(join(tmpdir(), "kiln-")), "native.png");
  runKiln([...args, "--out", out]);
  return readFileSync(out);
}

/** The largest and the mean difference between two PNGs' RGB values, out of 255. */
export function pixelDiff(a, b) {
  const [x, y] = [PNG.sync.read(a), PNG.sync.read(b)];
  assert.deepEqual([x.width, x.height], [y.width, y.height]);
  let [max, sum] = [0, 0];
  for (let i = 0; i < x.data.length; i++) {
    if (i % 4 === 3) continue;
    const d = Math.abs(x.data[i] - y.data[i]);
    max = Math.max(max, d);
    sum += d;
  }
  return { max, mean: sum / ((x.data.length * 3) / 4) };
}

/** Asserts the engine's parity tolerance between the page's image and the CLI's: max ≤ 3/255, mean ≤ 0.5/255. */
export function assertNative(browser, native, what) {
  const { max, mean } = pixelDiff(browser, native);
  console.log(`${what}: browser vs native CLI: max ${max}/255, mean ${mean.toFixed(4)}/255`);
  assert.ok(max <= 3 && mean <= 0.5, `${what}: max ${max}/255, mean ${mean}/255`);
}

/** Clicks Generate and resolves to the PNG bytes behind the download link. */
export async function generate(page, timeout = 240_000) {
  await page.getByRole("button", { name: "Generate", exact: true }).click();
  return resultPng(page, timeout);
}

/** Waits for the generated image, then saves it through the "Download PNG" link. */
export async function resultPng(page, timeout = 240_000) {
  await page.getByRole("img", { name: "Generated image" }).waitFor({ state: "visible", timeout });
  const [download] = await Promise.all([page.waitForEvent("download"), page.getByRole("link", { name: "Download PNG" }).click()]);
  return readFile(await download.path());
}

/** Waits for the page's error alert and returns its text. */
export async function errorText(page, timeout = 120_000) {
  const alert = page.locator("#error");
  await alert.waitFor({ state: "visible", timeout });
  return alert.textContent();
}

/** The cache's file records ({ path, received, complete }) for one model. */
export function cachedFiles(page, base) {
  return page.evaluate(async (base) => {
    // Opening a database that does not exist would create it empty, under the app's version.
    if (!(await indexedDB.databases()).some((d) => d.name === "kiln")) return [];
    const db = await new Promise((resolve, reject) => {
      const open = indexedDB.open("kiln");
      open.onsuccess = () => resolve(open.result);
      open.onerror = () => reject(open.error);
    });
    const records = await new Promise((resolve, reject) => {
      const req = db.transaction("files").objectStore("files").getAll(IDBKeyRange.bound(`${base}/`, `${base}/\uffff`));
      req.onsuccess = () => resolve(req.result);
      req.onerror = () => reject(req.error);
    });
    db.close();
    return records.map(({ path, received, complete }) => ({ path, received, complete }));
  }, base);
}

/** A copy of an f32 safetensors file with every value of tensor `name` set to `value`. */
export function withValue(bytes, name, value) {
  const out = Buffer.from(bytes);
  const n = Number(out.readBigUInt64LE(0));
  const entry = JSON.parse(out.subarray(8, 8 + n).toString())[name];
  assert.equal(entry.dtype, "F32");
  const [begin, end] = entry.data_offsets;
  for (let at = 8 + n + begin; at < 8 + n + end; at += 4) out.writeFloatLE(value, at);
  return out;
}

/** Logs each page's console errors to the test output, which helps when a test fails. */
export function echoConsole(page, name) {
  page.on("console", (m) => m.type() === "error" && console.log(`[${name}] ${m.text()}`));
  page.on("pageerror", (e) => console.log(`[${name}] ${e.message}`));
}
