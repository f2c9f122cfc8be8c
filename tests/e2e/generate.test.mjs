// Generating through the labelled controls gives the native CLI's image (within 3/255); the
// share link, opened with the network off, generates it again from the cache; Cancel
// stops a generation within one step. The tests share one browser context, in order.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { appUrl, assertNative, echoConsole, fillSettings, generate, kiln, launch, pixelDiff, resultPng, startServers } from "./harness.mjs";

const SETTINGS = { prompt: "a lighthouse at dusk", seed: 42, steps: 4, guidance: 7.5, width: 64, height: 64, scheduler: "euler" };

/** The CLI's image for SETTINGS. */
function nativeImage() {
  return kiln(["generate", "--model", "tests/fixtures/sd1-tiny", "--prompt", SETTINGS.prompt, "--seed", "42", "--steps", "4",
    "--guidance", "7.5", "--scheduler", "euler", "--width", "64", "--height", "64"]);
}

let browser, servers, context, native, first, offline;
before(async () => {
  native = nativeImage();
  [browser, servers] = await Promise.all([launch(), startServers()]);
  context = await browser.newContext();
}, { timeout: 30 * 60_000 });
after(async () => {
  await browser?.close();
  await servers?.close();
});

test("the labelled UI generates the native CLI's image", async () => {
  const page = await context.newPage();
  echoConsole(page, "generate");
  await page.goto(appUrl(servers.app, `${servers.hub.url}/sd1-tiny`));
  await fillSettings(page, SETTINGS);
  first = await generate(page);
  assertNative(first, native, "text to image");
  const text = first.toString("latin1");
  assert.ok(text.includes("parameters\0a lighthouse at dusk") && text.includes("Seed: 42"), "the PNG carries its parameters");
  await page.close();
});

test("the share link works offline, from the cache", async () => {
  assert.ok(first, "needs the first test's download");
  const setup = await context.newPage();
  await setup.goto(appUrl(servers.app, `${servers.hub.url}/sd1-tiny`));
  await fillSettings(setup, SETTINGS);
  const share = await setup.getByRole("link", { name: "Link to this model and these settings" }).getAttribute("href");
  await setup.close();

  const requests = servers.hub.log.length;
  await context.setOffline(true);
  offline = await context.newPage();
  echoConsole(offline, "offline");
  const start = Date.now();
  await offline.goto(share);
  // The page restores every setting from the link.
  assert.equal(await offline.getByLabel("Steps", { exact: true }).inputValue(), "4");
  assert.equal(await offline.getByLabel("Scheduler", { exact: true }).inputValue(), "euler");
  await offline.getByRole("button", { name: "Generate", exact: true }).click();
  const png = await resultPng(offline);
  console.log(`page open -> first image from a warm cache (offline, sd1-tiny 64x64, 4 steps): ${((Date.now() - start) / 1000).toFixed(1)} s`);
  assert.equal(pixelDiff(png, first).max, 0);
  assert.equal(servers.hub.log.length, requests, "no request reached the model host");
});

test("Cancel stops a generation within one step", async () => {
  assert.ok(offline, "needs the offline page, with the model loaded");
  // Record every status line the page shows.
  await offline.evaluate(() => {
    const status = document.getElementById("status");
    window.statuses = [];
    new MutationObserver(() => window.statuses.push(status.textContent)).observe(status, { childList: true, characterData: true, subtree: true });
  });
  await offline.getByLabel("Steps", { exact: true }).fill("40");
  await offline.getByRole("button", { name: "Generate", exact: true }).click();
  await offline.locator("#status").filter({ hasText: /step [1-9]\d* of 40/ }).waitFor({ timeout: 120_000 });
  await offline.getByRole("button", { name: "Cancel", exact: true }).click();
  await offline.locator("#status").filter({ hasText: /^Cancelled\.$/ }).waitFor({ timeout: 120_000 });
  const statuses = await offline.evaluate(() => window.statuses);
  const step = (s) => Number(/step (\d+) of/.exec(s)?.[1] ?? -1);
  const cancelling = statuses.indexOf("Cancelling…");
  const before = Math.max(...statuses.slice(0, cancelling).map(step));
  const afterwards = Math.max(...statuses.slice(cancelling).map(step));
  assert.ok(before < 40 && afterwards <= before + 1, `cancelled at step ${before}, stopped after ${afterwards}: ${statuses.join(" | ")}`);
});
