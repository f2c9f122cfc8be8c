// The studio around the engine: batches and the queue, the gallery (kept across reloads and
// offline, reopened with its settings), the download size and free storage shown before a
// download (and a download that cannot fit refused), and an installable app that opens
// offline to the last model used.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { serve } from "../../scripts/web/server.mjs";
import { appUrl, cachedFiles, echoConsole, errorText, generate, kiln, launch, launchPersistent, pixelDiff, resultPng, startServers, assertNative } from "./harness.mjs";

const SETTINGS = { prompt: "a red cube", seed: "7", steps: "2", guidance: "0", width: "64", height: "64", scheduler: "euler" };
const SIZE = /[\d.]+ (?:B|kB|MB|GB)/.source;

/** The CLI's image for SETTINGS with another seed. */
function nativeImage(seed) {
  return kiln(["generate", "--model", "tests/fixtures/sd1-tiny", "--prompt", SETTINGS.prompt, "--seed", String(seed), "--steps", "2",
    "--guidance", "0", "--scheduler", "euler", "--width", "64", "--height", "64"]);
}

let browser, servers;
before(async () => {
  [browser, servers] = await Promise.all([launch(), startServers()]);
});
after(async () => {
  await browser?.close();
  await servers?.close();
});

/** Keeps every status line the page shows in `window.statuses`. */
function recordStatuses(page) {
  return page.evaluate(() => {
    const status = document.getElementById("status");
    window.statuses = [];
    new MutationObserver(() => window.statuses.push(status.textContent)).observe(status, { childList: true, characterData: true, subtree: true });
  });
}

const galleryItems = (page) => page.getByRole("button", { name: /^Open a red cube, seed \d+$/ });
const button = (page, name) => page.getByRole("button", { name, exact: true });

test("the download size and free storage show before the download; a batch and a queued Generate fill the gallery", async () => {
  const context = await browser.newContext();
  const page = await context.newPage();
  echoConsole(page, "studio");
  const model = `${servers.hub.url}/sd1-tiny`;
  await page.goto(appUrl(servers.app, model, SETTINGS));

  // Before anything is fetched: what the download takes, the free storage, and what to do.
  const cache = page.locator("#cache-status");
  await cache.filter({ hasText: "Generate downloads" }).waitFor();
  const shown = new RegExp(`^Not downloaded yet; Generate downloads it once from 127\\.0\\.0\\.1:\\d+: (${SIZE}), with (${SIZE}) of storage free for this site\\.$`).exec(await cache.textContent());
  assert.ok(shown, await cache.textContent());
  await page.getByText(`Type a prompt and press Generate (or Ctrl+Enter). The first time, the model downloads once (${shown[1]})`).waitFor();
  // Only the pipeline's description was read (to refuse one Kiln does not run), and not kept.
  const read = servers.hub.log.filter((e) => e.method === "GET" && e.path.startsWith("/sd1-tiny/")).map((e) => e.path);
  assert.deepEqual([...new Set(read)], ["/sd1-tiny/model_index.json"], "nothing was downloaded yet");
  assert.deepEqual(await cachedFiles(page, model), [], "nor stored");

  // A batch of two (seeds 7 and 8), then two more pressed while it runs: seed 20 and seed 30,
  // which is removed from the queue before its turn.
  await page.getByLabel("Batch count", { exact: true }).fill("2");
  await button(page, "Generate").click();
  assert.match(page.url(), /[?&]count=2(&|$)/, "the share link keeps the batch count");
  await page.getByLabel("Batch count", { exact: true }).fill("1");
  for (const seed of ["20", "30"]) {
    await page.getByLabel("Seed", { exact: true }).fill(seed);
    await button(page, "Generate").click();
  }
  const queue = page.getByRole("list", { name: "Queue" });
  for (const line of ["Now: a red cube, seed 7", "Waiting: a red cube, seed 8", "Waiting: a red cube, seed 20", "Waiting: a red cube, seed 30"]) {
    await queue.getByText(line).waitFor();
  }
  await recordStatuses(page);
  await button(page, "Remove from the queue: a red cube, seed 30").click();
  assert.equal(await queue.getByText("seed 30").count(), 0);

  await page.locator("#status").filter({ hasText: /^Done in/ }).waitFor({ timeout: 240_000 });
  await queue.waitFor({ state: "hidden" });
  const statuses = await page.evaluate(() => window.statuses);
  for (const n of [1, 2, 3]) {
    assert.ok(statuses.some((s) => s === `Generating image ${n} of 3: step 2 of 2`), `progress counts the queue: ${statuses.join(" | ")}`);
  }
  await page.waitForFunction(() => document.querySelectorAll("#gallery-list button").length === 3);
  assert.deepEqual(await galleryItems(page).evaluateAll((items) => items.map((b) => b.getAttribute("aria-label"))),
    ["Open a red cube, seed 20", "Open a red cube, seed 8", "Open a red cube, seed 7"], "the newest first");

  // The download the page announced is what the cache holds now.
  await cache.filter({ hasText: "Stored in this browser" }).waitFor();
  assert.equal(await cache.textContent(), `Stored in this browser: as published, ${shown[1]} in all; works offline.`);
  assert.match(await page.locator("#storage").textContent(), new RegExp(`^Gallery: 3 images, ${SIZE}; ${SIZE} more storage is free for this site\\.$`));

  // Reopening an image restores its settings, as its share link would, and gives its PNG.
  await page.getByLabel("Prompt", { exact: true }).fill("something else");
  await page.getByLabel("Steps", { exact: true }).fill("9");
  await button(page, "Open a red cube, seed 8").click();
  await page.waitForFunction(() => document.getElementById("seed").value === "8");
  assert.equal(await page.getByLabel("Prompt", { exact: true }).inputValue(), "a red cube");
  assert.equal(await page.getByLabel("Steps", { exact: true }).inputValue(), "2");
  assert.equal(await page.getByLabel("Scheduler", { exact: true }).inputValue(), "euler");
  assert.equal(await page.getByLabel("Batch count", { exact: true }).inputValue(), "1");
  assert.equal(new URL(page.url()).searchParams.get("seed"), "8");
  assertNative(await resultPng(page), nativeImage(8), "the batch's second image (seed 8)");

  // It works as a result: Use as input, Delete.
  await button(page, "Use as input").click();
  await page.getByText("kiln-8.png: 64×64").waitFor();
  await button(page, "Open a red cube, seed 20").click();
  await page.getByRole("img", { name: "Generated image" }).waitFor();
  await button(page, "Delete").click();
  await page.getByRole("img", { name: "Generated image" }).waitFor({ state: "hidden" });
  await page.waitForFunction(() => document.querySelectorAll("#gallery-list button").length === 2);

  // Kept across a reload, with the network off too; "Delete all" empties it.
  await context.setOffline(true);
  await page.reload();
  await page.waitForFunction(() => document.querySelectorAll("#gallery-list button").length === 2);
  await button(page, "Open a red cube, seed 7").click();
  assertNative(await resultPng(page), nativeImage(7), "the batch's first image, reopened offline");
  page.once("dialog", (dialog) => dialog.accept());
  await button(page, "Delete all").click();
  await page.waitForFunction(() => document.querySelectorAll("#gallery-list button").length === 0);
  await page.getByRole("img", { name: "Generated image" }).waitFor({ state: "hidden" });
  assert.match(await page.locator("#storage").textContent(), /^Gallery: 0 images, 0 B/);
  await context.close();
});

test("Cancel stops the running image and the next queued one runs; Cancel all stops the queue", async () => {
  const context = await browser.newContext();
  const page = await context.newPage();
  echoConsole(page, "queue cancel");
  await page.goto(appUrl(servers.app, `${servers.hub.url}/sd1-tiny`, { ...SETTINGS, steps: "40", count: "3" }));
  assert.equal(await page.getByLabel("Batch count", { exact: true }).inputValue(), "3", "a share link sets the batch count");
  await button(page, "Generate").click();
  const status = page.locator("#status");
  await status.filter({ hasText: /^Generating image 1 of 3: step [1-9]\d* of 40$/ }).waitFor({ timeout: 240_000 });
  await button(page, "Cancel").click();
  await status.filter({ hasText: /^Generating image 2 of 3: step [1-9]\d* of 40$/ }).waitFor({ timeout: 120_000 });
  await button(page, "Cancel all").click();
  await status.filter({ hasText: /^Cancelled\.$/ }).waitFor({ timeout: 120_000 });
  await page.getByRole("list", { name: "Queue" }).waitFor({ state: "hidden" });
  // Nothing more starts, and nothing cancelled reaches the gallery.
  await page.waitForTimeout(2000);
  assert.equal(await status.textContent(), "Cancelled.");
  assert.equal(await galleryItems(page).count(), 0);
  await context.close();
});

test("a download that does not fit is refused before it starts, with both numbers", async () => {
  // A browser that allows the site 2 MB more than it uses (the page and the worker both ask).
  const prelude = `{
    const estimate = StorageManager.prototype.estimate;
    StorageManager.prototype.estimate = async function () {
      const e = await estimate.call(this);
      return { ...e, quota: e.usage + 2e6 };
    };
  }\n`;
  const withPrelude = (path, body) => (path === "/main.js" || path === "/worker.js" ? { body: Buffer.concat([Buffer.from(prelude), body]) } : null);
  const app = await serve({ root: "dist", intercept: withPrelude });
  const context = await browser.newContext();
  try {
    const page = await context.newPage();
    echoConsole(page, "quota");
    await page.goto(appUrl(app, `${servers.hub.url}/sd2-tiny`, SETTINGS));
    const cache = page.locator("#cache-status");
    await cache.filter({ hasText: "more storage" }).waitFor();
    const text = await cache.textContent();
    const shown = new RegExp(`^Not downloaded: The model needs (${SIZE}) more storage, but the browser allows this site only 2\\.00 MB more\\.`).exec(text);
    assert.ok(shown, text);

    await button(page, "Generate").click();
    assert.match(await errorText(page), new RegExp(`^The model needs ${shown[1]} more storage, but the browser allows this site only 2\\.00 MB more\\. Free disk space`));
    assert.ok(!servers.hub.log.some((e) => e.method === "GET" && e.path.startsWith("/sd2-tiny/") && e.path.endsWith(".safetensors")), "no weights were fetched");
  } finally {
    await context.close();
    await app.close();
  }
});

test("Chrome finds the app installable; it opens offline to the last model and settings", async () => {
  const context = await launchPersistent();
  try {
    const page = await context.newPage();
    echoConsole(page, "install");
    const model = `${servers.hub.url}/sd1-tiny`;
    await page.goto(appUrl(servers.app, model, { ...SETTINGS, prompt: "a lighthouse" }));
    await page.evaluate(() => navigator.serviceWorker.ready);
    const cdp = await context.newCDPSession(page);
    assert.deepEqual((await cdp.send("Page.getInstallabilityErrors")).installabilityErrors, []);
    const first = await generate(page);

    // The installed app starts at the manifest's start_url, which carries no settings.
    const { start_url } = JSON.parse((await cdp.send("Page.getAppManifest")).data);
    const requests = servers.hub.log.length;
    await context.setOffline(true);
    await page.goto(new URL(start_url, `${servers.app.url}/`).href);
    await page.getByText("Type a prompt and press Generate (or Ctrl+Enter). Every image is kept in the gallery below.").waitFor();
    assert.equal(await page.getByLabel("Model URL", { exact: true }).inputValue(), model);
    assert.equal(await page.getByLabel("Prompt", { exact: true }).inputValue(), "a lighthouse");
    await page.locator("#cache-status").filter({ hasText: "Stored in this browser" }).waitFor();
    const again = await generate(page);
    assert.equal(pixelDiff(again, first).max, 0);
    assert.equal(servers.hub.log.length, requests, "no request reached the model host");
  } finally {
    await context.close();
  }
});
