// Downloads: resumed with HTTP Range after a reload and after a dropped connection, and
// corrupt files rejected, discarded and fetched again on retry, whether kept as published or
// converted as they arrive; storage that runs out mid-download keeps what was stored; two
// tabs on one model download it once.
import assert from "node:assert/strict";
import { statSync } from "node:fs";
import { after, before, test } from "node:test";
import { serve } from "../../scripts/web/server.mjs";
import { appUrl, assertNative, cachedFiles, echoConsole, errorText, faults, generate, kiln, launch, pixelDiff, resultPng, startServers } from "./harness.mjs";

const SETTINGS = { prompt: "a red cube", seed: "1", steps: "1", guidance: "0", width: "64", height: "64" };
const TEXT_ENCODER = "text_encoder/model.safetensors";
const UNET = "unet/diffusion_pytorch_model.safetensors";
const VAE = "vae/diffusion_pytorch_model.safetensors";
const CHUNK = 4 << 20;

let browser, servers;
before(async () => {
  [browser, servers] = await Promise.all([launch(), startServers()]);
});
after(async () => {
  await browser?.close();
  await servers?.close();
});

const fileSize = (model, path) => statSync(`tests/fixtures/${model}/${path}`).size;
const gets = (log, path) => log.filter((e) => e.method === "GET" && e.path === path);

/** Waits until the page has stored a whole chunk of `path`. */
async function storedChunk(page, model, path) {
  while (!(await cachedFiles(page, model)).some((f) => f.path === path && f.received >= CHUNK)) await page.waitForTimeout(200);
}

test("a download resumes with Range after a reload and after a dropped connection", async () => {
  const { app, hub } = servers;
  const model = `${hub.url}/sd1-tiny`;
  const context = await browser.newContext();
  const page = await context.newPage();
  echoConsole(page, "resume");
  // The text encoder's first request hangs after 5 MB (the page is reloaded meanwhile);
  // the UNet's first request drops after 5 MB (the worker retries by itself).
  hub.fault(`/sd1-tiny/${TEXT_ENCODER}`, faults.stall(5e6));
  const unetStall = faults.stall(5e6);
  hub.fault(`/sd1-tiny/${UNET}`, unetStall);

  await page.goto(appUrl(app, model, SETTINGS));
  const generateButton = page.getByRole("button", { name: "Generate", exact: true });
  await generateButton.click();
  await storedChunk(page, model, TEXT_ENCODER);
  await page.reload();
  await generateButton.click();
  await storedChunk(page, model, UNET);
  unetStall.drop();
  const png = await resultPng(page);
  assert.ok(png.length > 0);

  for (const path of [TEXT_ENCODER, UNET]) {
    const requests = gets(hub.log, `/sd1-tiny/${path}`);
    const seen = JSON.stringify(requests);
    assert.equal(requests.length, 2, `${path}: two requests, not ${seen}`);
    const [first, second] = requests;
    assert.equal(first.range, null, seen);
    assert.equal(first.sent, 5e6, seen);
    assert.equal(second.range, `bytes=${CHUNK}-`, `${path} resumes from the stored chunk: ${seen}`);
    assert.equal(second.status, 206, seen);
    assert.equal(second.sent, fileSize("sd1-tiny", path) - CHUNK, seen);
  }
  const files = await cachedFiles(page, model);
  assert.ok(files.length > 0 && files.every((f) => f.complete));

  // Removing the model frees every byte of it.
  const total = files.reduce((sum, f) => sum + f.received, 0);
  await page.getByRole("button", { name: "Remove cached model" }).click();
  await page.getByText(`Removed the cached model: ${(total / 1e6).toFixed(1)} MB freed.`).waitFor();
  assert.deepEqual(await cachedFiles(page, model), []);
  await context.close();
});

test("a corrupt or truncated file is reported, discarded, and fetched again on retry", async () => {
  const { app, hub } = servers;
  const model = `${hub.url}/sd2-tiny`;
  const context = await browser.newContext();
  const page = await context.newPage();
  echoConsole(page, "corrupt");
  const unet = UNET.replace(".safetensors", ".fp16.safetensors");
  const vae = VAE.replace(".safetensors", ".fp16.safetensors");
  hub.fault(`/sd2-tiny/${unet}`, faults.truncate(100_000));
  hub.fault(`/sd2-tiny/${vae}`, faults.corrupt());
  await page.goto(appUrl(app, model, SETTINGS));
  const generateButton = page.getByRole("button", { name: "Generate", exact: true });

  await generateButton.click();
  assert.match(await errorText(page), new RegExp(`${unet} is corrupt \\(its header describes \\d+ bytes but 100000 arrived\\)`));
  assert.ok(!(await cachedFiles(page, model)).some((f) => f.path === unet), "nothing of the truncated file is kept");

  await generateButton.click();
  assert.match(await errorText(page), new RegExp(`${vae} is corrupt \\(its SHA-256 differs`));
  const files = await cachedFiles(page, model);
  assert.ok(!files.some((f) => f.path === vae), "nothing of the corrupt file is kept");
  assert.ok(files.some((f) => f.path === unet && f.complete), "the retried UNet is complete");

  // Both faults were one-shot: the host now serves good files, and a retry works.
  const png = await generate(page);
  assert.ok(png.length > 0);
  assert.equal(gets(hub.log, `/sd2-tiny/${vae}`).length, 2);
  await context.close();
});

test("a truncated file kept converted (q8) is reported, discarded, and fetched again on retry", async () => {
  const { app, hub } = servers;
  const model = `${hub.url}/sd1-tiny`;
  const context = await browser.newContext();
  const page = await context.newPage();
  echoConsole(page, "truncated q8");
  hub.fault(`/sd1-tiny/${UNET}`, faults.truncate(100_000));
  await page.goto(appUrl(app, model, { ...SETTINGS, precision: "q8" }));
  await page.getByRole("button", { name: "Generate", exact: true }).click();
  // The whole (short) body arrived: that is a corrupt file, not a dropped connection to retry.
  assert.match(await errorText(page), new RegExp(`${UNET} is corrupt \\(its header describes \\d+ bytes but 100000 arrived\\)`));
  assert.ok(!(await cachedFiles(page, model)).some((f) => f.path === `${UNET}#q8`), "nothing of the truncated file is kept");

  const png = await generate(page);
  assert.ok(png.length > 0);
  assert.ok((await cachedFiles(page, model)).some((f) => f.path === `${UNET}#q8` && f.complete), "the retried UNet is stored converted");
  await context.close();
});

test("a cached file that lost a stored chunk is fetched again, and the image is the same", async () => {
  const { app, hub } = servers;
  const model = `${hub.url}/sd1-tiny`;
  const context = await browser.newContext();
  try {
    const page = await context.newPage();
    echoConsole(page, "evicted");
    await page.goto(appUrl(app, model, SETTINGS));
    const before = await generate(page);
    // As eviction or damaged storage would leave it: the record says complete, a chunk is gone.
    await page.evaluate(async (key) => {
      const db = await new Promise((resolve, reject) => {
        const open = indexedDB.open("kiln");
        open.onsuccess = () => resolve(open.result);
        open.onerror = () => reject(open.error);
      });
      await new Promise((resolve, reject) => {
        const tx = db.transaction("chunks", "readwrite");
        tx.objectStore("chunks").delete([key, 1]);
        tx.oncomplete = resolve;
        tx.onerror = () => reject(tx.error);
      });
      db.close();
    }, `${model}/${UNET}`);
    const fetched = gets(hub.log, `/sd1-tiny/${UNET}`).length;
    await page.reload();
    const after = await generate(page);
    assert.equal(gets(hub.log, `/sd1-tiny/${UNET}`).length, fetched + 1, "the damaged file is downloaded again");
    assert.equal(pixelDiff(after, before).max, 0, "the same image as before the damage");
  } finally {
    await context.close();
  }
});

test("storage that runs out mid-download keeps what was stored and resumes from it once there is space", async () => {
  // The disk is full from the UNet's second chunk on, until the test frees it: those
  // IndexedDB writes fail at commit as a full disk fails them. (Chrome's DevTools quota
  // override has no effect on this headless Chromium, so the worker is given this instead.)
  const prelude = `{
    const put = IDBObjectStore.prototype.put;
    IDBObjectStore.prototype.put = function (value, key) {
      const request = put.call(this, value, key);
      const tx = this.transaction;
      const full = !self.diskFreed && Array.isArray(key) && String(key[0]).endsWith("/${UNET}") && key[1] >= 1;
      if (full && !tx.failing) {
        tx.failing = true;
        Object.defineProperty(tx, "error", { value: new DOMException("The quota has been exceeded.", "QuotaExceededError") });
        queueMicrotask(() => tx.abort());
      }
      return request;
    };
  }\n`;
  const withPrelude = (path, body) => (path === "/worker.js" ? { body: Buffer.concat([Buffer.from(prelude), body]) } : null);
  const app = await serve({ root: "dist", intercept: withPrelude });
  const { hub } = servers;
  const model = `${hub.url}/sd1-tiny`;
  const native = kiln(["generate", "--model", "tests/fixtures/sd1-tiny", "--prompt", SETTINGS.prompt, "--seed", "1", "--steps", "1", "--guidance", "0", "--width", "64", "--height", "64"]);
  const context = await browser.newContext();
  try {
    const page = await context.newPage();
    echoConsole(page, "disk full");
    const before = hub.log.length;
    await page.goto(appUrl(app, model, SETTINGS));
    await page.getByRole("button", { name: "Generate", exact: true }).click();
    assert.match(await errorText(page), /^The browser's storage for this site is full: [\d.]+ [MG]B used of the [\d.]+ [MG]B it allows\. Free disk space or remove other cached models, then press Generate: the download continues where it stopped\./);
    const kept = (await cachedFiles(page, model)).find((f) => f.path === UNET);
    assert.deepEqual(kept, { path: UNET, received: CHUNK, complete: false }, "the stored chunk is kept, and not trusted as complete");

    for (const worker of page.workers()) await worker.evaluate(() => (self.diskFreed = true));
    const png = await generate(page);
    const log = hub.log.slice(before);
    const [first, ...resumed] = gets(log, `/sd1-tiny/${UNET}`);
    assert.equal(first.range, null);
    assert.ok(resumed.length >= 1 && resumed.every((e) => e.range === `bytes=${CHUNK}-`), `every later request continues from the stored chunk: ${JSON.stringify(resumed)}`);
    assert.equal(gets(log, `/sd1-tiny/${TEXT_ENCODER}`).length, 1, "the text encoder, stored before the disk filled, is not fetched again");
    assert.ok((await cachedFiles(page, model)).every((f) => f.complete));
    assertNative(png, native, "after the disk filled mid-download");
  } finally {
    await context.close();
    await app.close();
  }
});

test("two tabs on the same model download each file once", async () => {
  const { app, hub } = servers;
  const model = `${hub.url}/sd2-tiny`;
  const context = await browser.newContext();
  try {
    const before = hub.log.length;
    const pages = await Promise.all([context.newPage(), context.newPage()]);
    pages.forEach((page, i) => echoConsole(page, `tab ${i + 1}`));
    await Promise.all(pages.map((page) => page.goto(appUrl(app, model, SETTINGS))));
    const [a, b] = await Promise.all(pages.map((page) => generate(page)));
    assert.equal(pixelDiff(a, b).max, 0, "the same image in both tabs");
    const weights = hub.log.slice(before).filter((e) => e.method === "GET" && e.path.startsWith("/sd2-tiny/") && e.path.endsWith(".safetensors"));
    assert.ok(weights.length >= 3, "the weights were downloaded");
    assert.equal(new Set(weights.map((e) => e.path)).size, weights.length, `each weight file fetched once: ${weights.map((e) => e.path).join(", ")}`);
  } finally {
    await context.close();
  }
});
