// Quantized weights in the browser. A q8 Kiln package (made by `kiln pack`) is streamed shard by
// shard. An original repo is converted to q4 in the worker while it downloads, and only the
// converted weights are cached. Each gives the native CLI's image for the same weights, and
// does so again after an offline reload, from the cache alone.
import assert from "node:assert/strict";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { serve } from "../../scripts/web/server.mjs";
import { appUrl, assertNative, cachedFiles, echoConsole, fillSettings, generate, kiln, launch, pixelDiff, resultPng, runKiln, startServers } from "./harness.mjs";

const SETTINGS = { prompt: "a kiln in a field", seed: 7, steps: 2, guidance: 7.5, width: 64, height: 64, scheduler: "euler" };

/** The CLI's image of SETTINGS from `model` (extra: e.g. ["--weights", "q4"]). */
function nativeImage(model, extra = []) {
  return kiln(["generate", "--model", model, ...extra, "--prompt", SETTINGS.prompt, "--seed", String(SETTINGS.seed), "--steps", String(SETTINGS.steps),
    "--guidance", String(SETTINGS.guidance), "--scheduler", SETTINGS.scheduler, "--width", "64", "--height", "64"]);
}

let browser, servers, packages, dir, nativePackage, nativeQ4;
const packageLog = [];
before(async () => {
  dir = mkdtempSync(join(tmpdir(), "kiln-quantized-"));
  runKiln(["pack", "--model", "tests/fixtures/sd1-tiny", "--out", join(dir, "sd1-q8"), "--format", "q8"]);
  nativePackage = nativeImage(join(dir, "sd1-q8"));
  nativeQ4 = nativeImage("tests/fixtures/sd1-tiny", ["--weights", "q4"]);
  [browser, servers, packages] = await Promise.all([launch(), startServers(), serve({ root: dir, cors: true, log: packageLog })]);
}, { timeout: 30 * 60_000 });
after(async () => {
  await browser?.close();
  await servers?.close();
  await packages?.close();
});

/** Generates SETTINGS at `url`, then again from its share link with the network off. */
async function generateThenOffline(url, name, log, precision = null) {
  const context = await browser.newContext();
  const page = await context.newPage();
  echoConsole(page, name);
  await page.goto(url);
  if (precision) await page.getByLabel("Precision", { exact: true }).selectOption(precision);
  await fillSettings(page, SETTINGS);
  const png = await generate(page);
  const status = await page.locator("#cache-status").textContent();
  const share = await page.getByRole("link", { name: "Link to this model and these settings" }).getAttribute("href");
  const records = await cachedFiles(page, new URL(url).searchParams.get("model"));

  const requests = log.length;
  await context.setOffline(true);
  const offline = await context.newPage();
  echoConsole(offline, `${name} offline`);
  await offline.goto(share);
  await offline.getByRole("button", { name: "Generate", exact: true }).click();
  const again = await resultPng(offline);
  assert.equal(log.length, requests, "no request reached the model host");
  await context.close();
  return { png, again, status, records };
}

test("a q8 package streams into the cache and generates the CLI's image, offline too", async () => {
  const model = `${packages.url}/sd1-q8`;
  const { png, again, status, records } = await generateThenOffline(appUrl(servers.app, model), "package", packageLog);
  assertNative(png, nativePackage, "q8 package");
  assert.equal(pixelDiff(again, png).max, 0, "the offline reload gives the same image");
  assert.match(status, /Kiln package\): q8/);
  assert.deepEqual(records.map((r) => r.path).sort(), ["manifest.json", "shard-00000.bin"]);
  assert.ok(records.every((r) => r.complete));
});

test("an original repo is converted to q4 while it downloads; only q4 is cached", async () => {
  const model = `${servers.hub.url}/sd1-tiny`;
  const { png, again, status, records } = await generateThenOffline(appUrl(servers.app, model), "q4", servers.hub.log, "q4");
  assertNative(png, nativeQ4, "repo converted to q4 in the worker (CLI: --weights q4)");
  assert.equal(pixelDiff(again, png).max, 0, "the offline reload gives the same image");
  assert.match(status, /: q4, /);
  const weights = records.filter((r) => r.path.includes(".safetensors"));
  assert.equal(weights.length, 3);
  assert.ok(weights.every((r) => r.path.endsWith("#q4") && r.complete), JSON.stringify(weights));
});
