// A crashed worker and a lost GPU device each produce a message, not a hang, and the page
// recovers without a reload: a fresh worker reloads the model from the cache. A GPU kernel the
// browser refuses to compile stops the run with its name, and NaN in a model's weights with
// where it appeared, never with an image. A repo of a pipeline the engine does not run is
// refused from its model_index.json, before a weight is fetched.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { cpSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { serve } from "../../scripts/web/server.mjs";
import { appUrl, echoConsole, errorText, generate, launch, startServers, withValue } from "./harness.mjs";

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

test("NaN in a model's weights is reported as non-finite, and no image is shown", async () => {
  const root = mkdtempSync(join(tmpdir(), "kiln-nan-"));
  const unet = join(root, "sd1-nan/unet/diffusion_pytorch_model.safetensors");
  cpSync("tests/fixtures/sd1-tiny", join(root, "sd1-nan"), { recursive: true });
  writeFileSync(unet, withValue(readFileSync(unet), "conv_out.bias", NaN));
  const host = await serve({ root, cors: true });
  const context = await browser.newContext();
  try {
    const poisoned = await context.newPage();
    echoConsole(poisoned, "non-finite");
    await poisoned.goto(appUrl(servers.app, `${host.url}/sd1-nan`, SETTINGS));
    await poisoned.getByRole("button", { name: "Generate", exact: true }).click();
    assert.match(await errorText(poisoned), /No image: non-finite values \(NaN or Inf\) in the latents after UNet step 1\/1/);
    assert.ok(await poisoned.getByRole("img", { name: "Generated image" }).isHidden());
  } finally {
    await context.close();
    await host.close();
  }
});

test("a repo of a pipeline the engine does not run is refused before any weight is fetched", async () => {
  // Stable Cascade's model_index.json, beside SD 1.x's files: the weights are there, but never asked for.
  const root = mkdtempSync(join(tmpdir(), "kiln-cascade-"));
  cpSync("tests/fixtures/sd1-tiny", join(root, "cascade"), { recursive: true });
  const index = { _class_name: "StableCascadeDecoderPipeline", decoder: ["diffusers", "StableCascadeUNet"] };
  writeFileSync(join(root, "cascade/model_index.json"), JSON.stringify(index));
  const log = [];
  const host = await serve({ root, cors: true, log });
  const context = await browser.newContext();
  try {
    const page = await context.newPage();
    echoConsole(page, "unsupported pipeline");
    await page.goto(appUrl(servers.app, `${host.url}/cascade`, SETTINGS));
    const refusal = /pipeline class StableCascadeDecoderPipeline is not one Kiln runs \(StableDiffusionPipeline, /;
    await page.locator("#cache-status").filter({ hasText: refusal }).waitFor({ timeout: 60_000 });
    await page.getByRole("button", { name: "Generate", exact: true }).click();
    assert.match(await errorText(page), refusal);
    // Whether it is a package (manifest.json), then which pipeline: nothing else.
    assert.deepEqual([...new Set(log.map((entry) => entry.path))].sort(), ["/cascade/manifest.json", "/cascade/model_index.json"]);
  } finally {
    await context.close();
    await host.close();
  }
});
