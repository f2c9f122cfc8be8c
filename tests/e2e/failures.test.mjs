// A crashed worker and a lost GPU device each produce a message, not a hang, and the page
// recovers without a reload: a fresh worker reloads the model from the cache.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { appUrl, echoConsole, errorText, generate, launch, startServers } from "./harness.mjs";

const SETTINGS = { prompt: "a blue sphere", seed: "3", steps: "1", guidance: "0", width: "64", height: "64" };

let browser, servers, page;
before(async () => {
  [browser, servers] = await Promise.all([launch(), startServers()]);
  page = await browser.newPage();
  echoConsole(page, "failures");
  await page.goto(appUrl(servers.app, `${servers.hub.url}/sd1-tiny`, SETTINGS));
  await generate(page);
});
after(async () => {
  await browser?.close();
  await servers?.close();
});

test("a crashed worker is reported and replaced", async () => {
  const [worker] = page.workers();
  // An uncaught error in the worker, as a wasm trap outside any call would raise.
  await worker.evaluate(() => setTimeout(() => { throw new Error("simulated crash"); }));
  assert.match(await errorText(page), /The engine stopped: .*simulated crash/);
  assert.ok((await generate(page)).length > 0);
});

test("a lost GPU device is reported and the model reloads from the cache", async () => {
  const cdp = await browser.newBrowserCDPSession();
  await cdp.send("Browser.crashGpuProcess");
  assert.match(await errorText(page), /The GPU device was lost/);
  await page.locator("#status").filter({ hasText: /^Model ready\.$/ }).waitFor({ timeout: 120_000 });
  assert.ok((await generate(page)).length > 0);
});
