// A crashed worker and a lost GPU device each produce a message, not a hang, and the page
// recovers without a reload: a fresh worker reloads the model from the cache. A GPU kernel the
// browser refuses to compile stops the run with its name, never with an image.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { serve } from "../../scripts/web/server.mjs";
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

test("a kernel the browser refuses is reported by name, and no image is shown", async () => {
  // A browser whose shader compiler rejects the convolution kernel: its WGSL gets a bad line.
  const prelude = `{
    const create = GPUDevice.prototype.createShaderModule;
    GPUDevice.prototype.createShaderModule = function (d) {
      return create.call(this, d.label?.startsWith("conv_tile") ? { ...d, code: d.code + "\\nnot wgsl" } : d);
    };
  }\n`;
  const app = await serve({ root: "dist", intercept: (path, body) => (path === "/worker.js" ? { body: Buffer.concat([Buffer.from(prelude), body]) } : null) });
  const context = await browser.newContext();
  try {
    const broken = await context.newPage();
    echoConsole(broken, "refused kernel");
    await broken.goto(appUrl(app, `${servers.hub.url}/sd1-tiny`, SETTINGS));
    await broken.getByRole("button", { name: "Generate", exact: true }).click();
    assert.match(await errorText(broken), /conv_tile/);
    assert.ok(await broken.getByRole("img", { name: "Generated image" }).isHidden());
  } finally {
    await context.close();
    await app.close();
  }
});
