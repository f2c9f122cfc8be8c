// Downloads from a host that answers as the Hugging Face hub does (scripts/web/hub.mjs):
// weights redirected to a CDN on another origin, CORS that exposes only some headers, ETags in
// the hub's forms, LFS pointers stating the SHA-256. The page and the CLI both get through a
// busy host, a CDN that sends wrong bytes, and (the page) a file that changes mid-download;
// each failure names the file and what to do, and both make the same image from it.
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, readdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { serveHub } from "../../scripts/web/hub.mjs";
import { serve } from "../../scripts/web/server.mjs";
import { appUrl, assertNative, cachedFiles, echoConsole, errorText, generate, launch, runKilnAsync, withValue } from "./harness.mjs";

const SETTINGS = { prompt: "a red cube", seed: "1", steps: "1", guidance: "0", width: "64", height: "64" };
const TEXT_ENCODER = "sd1-tiny/text_encoder/model.safetensors";
const UNET = "sd1-tiny/unet/diffusion_pytorch_model.safetensors";
const VAE = "sd1-tiny/vae/diffusion_pytorch_model.safetensors";
const CHUNK = 4 << 20;

let browser, app, hub;
before(async () => {
  [browser, app, hub] = await Promise.all([launch(), serve({ root: "dist" }), serveHub({ root: "tests/fixtures" })]);
});
after(async () => {
  await browser?.close();
  await Promise.all([app?.close(), hub?.close()]);
});

/** `kiln generate` of SETTINGS from `model` with its own empty cache; resolves to { code, stderr, png }. */
async function cliGenerate(model, env = {}) {
  const dir = mkdtempSync(join(tmpdir(), "kiln-hub-"));
  const out = join(dir, "out.png");
  const args = ["generate", "--model", model, "--prompt", SETTINGS.prompt, "--seed", "1", "--steps", "1", "--guidance", "0", "--width", "64", "--height", "64", "--out", out];
  const run = await runKilnAsync(args, { XDG_CACHE_HOME: join(dir, "cache"), ...env });
  return { ...run, png: run.code === 0 ? readFileSync(out) : null, cache: join(dir, "cache") };
}

/** The hub's log entries from the `since`th on for `origin`, `method` and a path containing `pathPart`. */
const requests = (origin, method, pathPart, since = 0) =>
  hub.log.slice(since).filter((e) => e.origin === origin && e.method === method && e.path.includes(pathPart));

test("the CLI follows the hub's redirects, waits for a busy host, checks the stated SHA-256 and explains a refusal", async () => {
  const model = hub.repo("sd1-tiny");
  const local = await cliGenerate("tests/fixtures/sd1-tiny");
  assert.equal(local.code, 0, local.stderr);

  hub.refuse(UNET, { status: 429, retryAfter: 1 });
  hub.refuse(VAE, { status: 503, retryAfter: 1 });
  const fetched = await cliGenerate(model);
  assert.equal(fetched.code, 0, fetched.stderr);
  assert.match(fetched.stderr, /unet\/diffusion_pytorch_model\.safetensors: the host is busy \(HTTP 429\); asking again in 1 s/);
  assert.match(fetched.stderr, /vae\/diffusion_pytorch_model\.safetensors: the host is busy \(HTTP 503\); asking again in 1 s/);
  assert.ok(requests("cdn", "GET", "/repos/").length >= 3, "the weights came from the CDN");
  assertNative(fetched.png, local.png, "hub-like host vs local folder (CLI)");

  // Other bytes than the hub's digest: refused by name, and nothing of it kept.
  hub.corrupt(UNET);
  const corrupt = await cliGenerate(model);
  assert.equal(corrupt.code, 2, corrupt.stderr);
  assert.match(corrupt.stderr, /unet\/diffusion_pytorch_model\.safetensors: its SHA-256 differs from the one the host states; run again/);
  const cached = readdirSync(corrupt.cache, { recursive: true });
  assert.ok(cached.some((f) => f.endsWith("unet/config.json")), cached.join(", "));
  assert.deepEqual(cached.filter((f) => f.includes("unet/diffusion_pytorch_model")), [], "nothing of the corrupt file is cached");

  // A host that asks for a long wait is reported at once, not waited for.
  hub.refuse("sd1-tiny/model_index.json", { status: 429, retryAfter: 3600 });
  const busy = await cliGenerate(model);
  assert.equal(busy.code, 2, busy.stderr);
  assert.match(busy.stderr, /model_index\.json: the host is busy \(HTTP 429\) and asks to wait 3600 s; run again later/);

  // A gated repo answers 401: said so, with what to do instead.
  hub.refuse("sd1-tiny/model_index.json", { status: 401 });
  const gated = await cliGenerate(model);
  assert.equal(gated.code, 2, gated.stderr);
  assert.match(gated.stderr, /model_index\.json: the host refuses access \(HTTP 401\); a gated or private repo must be downloaded by hand/);
});

test("the page gets a model through the hub's redirects, a busy host, a corrupt CDN answer and a file that changes", async () => {
  const model = hub.repo("sd1-tiny");
  const since = hub.log.length;
  const context = await browser.newContext();
  const page = await context.newPage();
  echoConsole(page, "hub");
  // A busy answer to a size probe and to a download; the page cannot read Retry-After (the
  // hub does not expose it) and waits on its own.
  hub.refuse("sd1-tiny/unet/config.json", { method: "HEAD", status: 503 });
  hub.refuse(UNET, { status: 429 });
  hub.corrupt(VAE);
  const stall = hub.stall(TEXT_ENCODER, 5e6);

  await page.goto(appUrl(app, model, SETTINGS));
  await page.getByRole("button", { name: "Generate", exact: true }).click();
  while (!(await cachedFiles(page, model)).some((f) => f.path === "text_encoder/model.safetensors" && f.received >= CHUNK)) await page.waitForTimeout(200);
  // A new commit changes the text encoder while its download is held; the connection drops.
  const original = readFileSync(`tests/fixtures/${TEXT_ENCODER}`);
  const changed = withValue(original, "text_model.final_layer_norm.bias", 0.25);
  hub.change(TEXT_ENCODER, changed);
  stall.drop();

  assert.match(await errorText(page), /vae\/diffusion_pytorch_model\.safetensors is corrupt \(its SHA-256 differs from the one the host or manifest states\)/);
  const png = await generate(page);

  // The stored part of the old file was not continued with the new one's bytes.
  const encoder = requests("cdn", "GET", "/repos/", since).filter((e) => e.file === TEXT_ENCODER);
  assert.deepEqual(encoder.map((e) => [e.range, e.status]), [[null, 200], [`bytes=${CHUNK}-`, 206], [null, 200]], JSON.stringify(encoder));
  assert.ok(requests("hub", "GET", "/raw/main/text_encoder/model.safetensors", since).length >= 1, "the SHA-256 came from the LFS pointer");
  assert.ok((await cachedFiles(page, model)).every((f) => f.complete));

  const cli = await cliGenerate(model);
  assert.equal(cli.code, 0, cli.stderr);
  assertNative(png, cli.png, "hub-like host, changed text encoder");
  const before = await cliGenerate("tests/fixtures/sd1-tiny");
  assert.ok(!before.png.equals(cli.png), "the changed text encoder changes the image");
  await context.close();
});
